"""`vfusion3d-lightning filter`: keep the generated videos the quality SVM scores as good (resumable)."""

from __future__ import annotations

from pathlib import Path

from vfusion3d_lightning.data.curate_shards import CurationReport, file_digest, filter_shards
from vfusion3d_lightning.models.curation.quality import QualitySVM


def filter_videos(shards: str, svm: Path, out: Path, threshold: float = 0.5, progress: bool = True) -> CurationReport:
    """Score each video from its cached DINO features and write those with P(good) >= `threshold`, their
    `quality` set, to shards of the same names; filter_report.json counts kept and dropped per shard.

    Args:
        shards: folder of shard-NNNNNN.tar files with cached features, or a shard pattern.
        svm: the quality SVM: the folder the quality config writes (quality_svm/), a registry name or a
            QualityModule .ckpt.
        out: folder for the kept videos' shards.
        threshold: keep videos with P(good) at or above this.
        progress: show a progress bar.
    """
    report = filter_shards(shards, out, QualitySVM.from_pretrained(svm), threshold, svm_id=file_digest(svm),
                           progress=progress)
    totals = report.totals()
    print(f"kept {totals.get('kept', 0)} of {totals.get('videos', 0)} videos (threshold {threshold}) -> "
          f"{out} (report: filter_report.json)")
    return report
