"""`vfusion3d-lightning label`: elevation + orbit cameras, masks and quality scores into videos' shards."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vfusion3d_lightning.data.curate_shards import CurationReport, Labellers, file_digest, label_shards
from vfusion3d_lightning.models.curation.elevation import ElevationMLP
from vfusion3d_lightning.models.curation.quality import QualitySVM


def label(shards: str, out: Path, elevation: Path | None = None,
          masks: Literal["threshold", "rembg", "none"] = "threshold", mask_tolerance: int = 12,
          svm: Path | None = None, radius: float = 1.5, progress: bool = True) -> CurationReport:
    """Write each video again with its estimated elevation and the orbit cameras that implies, a foreground
    mask in the alpha channel, and a quality score where none is set; a rerun skips finished shards. The frames'
    RGB is kept as generated; the metadata's `mask_method` marks the mask as estimated, so the LRM's data module
    uses it for the opacity loss only (MultiViewDataModule's `composite_estimated_masks`).

    Args:
        shards: folder of shard-NNNNNN.tar files with cached features, or a shard pattern.
        out: folder for the labelled shards.
        elevation: the elevation MLP: the folder the elevation config writes (elevation_mlp/), a registry name
            or an ElevationModule .ckpt; null leaves elevations as they are.
        masks: `threshold`: objects on white (offline); `rembg`: a saliency model (weights local); `none`.
        mask_tolerance: threshold masks: how far from white a pixel may be and still count as background.
        svm: a quality SVM, to score the videos that filter did not score.
        radius: camera distance of the orbit, as rendered.
        progress: show a progress bar.
    """
    labellers = Labellers(elevation=ElevationMLP.from_pretrained(elevation) if elevation else None,
                          masks=None if masks == "none" else masks, mask_tolerance=mask_tolerance,
                          quality=QualitySVM.from_pretrained(svm) if svm else None, radius=radius)
    ids = {name: file_digest(path) for name, path in (("elevation", elevation), ("quality", svm)) if path}
    report = label_shards(shards, out, labellers, ids, progress=progress)
    totals = report.totals()
    print(f"labelled {totals.get('videos', 0)} videos: elevation {totals.get('elevation', 0)}, masks "
          f"{totals.get('masks', 0)}, quality {totals.get('quality', 0)} -> {out} (report: label_report.json)")
    return report
