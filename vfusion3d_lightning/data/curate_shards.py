"""Curation applied to generated videos, shard by shard: `filter` keeps the videos the quality SVM scores as
good; `label` adds the estimated elevation with the orbit cameras it implies, foreground masks, and quality
scores, so the LRM can train on them.

Each input shard gives one output shard of the same name in the output folder, written as `.partial` and
renamed when complete; the cached features of its samples are carried beside it (no second encoding pass). A
rerun skips shards already done, and refuses an output folder made with other settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from vfusion3d_lightning.data.feature_cache import cache_path, read_features, shard_paths, write_features
from vfusion3d_lightning.data.render import default_intrinsics
from vfusion3d_lightning.data.schema import (
    MASK_METHOD_KEY,
    SampleError,
    decode_sample,
    encode_sample,
    read_raw_samples,
    unreadable_shard,
    write_shard,
)
from vfusion3d_lightning.hub import sha256_of
from vfusion3d_lightning.io import atomic_write, folder_lock

FILTER_REPORT, LABEL_REPORT = "filter_report.json", "label_report.json"


@dataclass
class CurationReport:
    """What a filter or label run did. `shards`: shard name -> counts; `settings` must match on resume."""

    settings: dict[str, Any]
    shards: dict[str, dict[str, int]] = field(default_factory=dict)

    def totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for counts in self.shards.values():
            for name, value in counts.items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def save(self, path: Path) -> None:
        text = json.dumps({"settings": self.settings, "totals": self.totals(), "shards": self.shards}, indent=2)
        atomic_write(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def resume(cls, path: Path, settings: dict[str, Any]) -> "CurationReport":
        """The report of an earlier run into the same folder, or a new one; other settings are an error."""
        if not path.is_file():
            return cls(settings)
        saved = json.loads(path.read_text())
        if saved["settings"] != settings:
            changed = sorted(k for k in set(settings) | set(saved["settings"])
                             if settings.get(k) != saved["settings"].get(k))
            raise ValueError(f"{path.parent} was written with other settings ({', '.join(changed)}: "
                             f"{[saved['settings'].get(k) for k in changed]} then, {[settings.get(k) for k in changed]}"
                             " now); use a new output folder, or delete it to start over")
        return cls(settings, saved["shards"])


def file_digest(path: str | Path) -> str:
    """A short digest of a file, or of a folder's files (an exported model), for the settings record."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256("".join(sha256_of(file) for file in files).encode()).hexdigest()[:16]


def _carry_features(shard: Path, out_shard: Path, keys: list[str], kept: list[str]) -> None:
    """Copy the rows of `kept` keys of every feature cache beside `shard` to caches beside `out_shard`."""
    pattern = cache_path(shard, "*").name
    rows = [keys.index(k) for k in kept]
    for cache in shard.parent.glob(pattern):
        with safe_open(str(cache), "pt") as handle:
            metadata = handle.metadata()
            if json.loads(metadata["keys"]) != keys:
                continue  # written for another version of the shard: the new shard's must be computed again
            quality, elevation = handle.get_tensor("quality")[rows], handle.get_tensor("elevation")[rows]
        write_features(out_shard, metadata["tag"], kept, json.loads(metadata["frames"]), quality, elevation)


def _raw_samples(shard: Path) -> list[dict[str, Any]]:
    """A shard's samples as stored (suffix -> bytes), in order, without decoding images."""
    samples = []
    for raw in read_raw_samples(shard):
        samples.append({k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"})
    return samples


def _run(shards: str | Path | list[str], out_dir: str | Path, report_name: str, settings: dict[str, Any],
         process: Callable[[Path, Path], dict[str, int]], description: str, progress: bool) -> CurationReport:
    out_dir = Path(out_dir)
    with folder_lock(out_dir, report_name.removesuffix("_report.json")):
        return _run_locked(shards, out_dir, report_name, settings, process, description, progress)


def _run_locked(shards: str | Path | list[str], out_dir: Path, report_name: str, settings: dict[str, Any],
                process: Callable[[Path, Path], dict[str, int]], description: str, progress: bool) -> CurationReport:
    report = CurationReport.resume(out_dir / report_name, settings)
    inputs = shard_paths(shards)
    if any(p.parent.resolve() == out_dir.resolve() for p in inputs):
        raise ValueError(f"the output folder {out_dir} holds the input shards; write to another folder")
    for shard in tqdm(inputs, desc=description, unit="shard", disable=not progress):
        if shard.name in report.shards:
            continue
        try:
            report.shards[shard.name] = process(shard, out_dir / shard.name)
        except tarfile.TarError as err:
            raise unreadable_shard(shard, err) from err
        except SampleError as err:  # names the sample; say which shard to mend and that the rest is kept
            raise SampleError(f"{err}; write shard {shard} again or move it out of the folder, then rerun "
                              f"({report_name} keeps the shards already done)") from err
        report.save(out_dir / report_name)  # after the shard, so a kill redoes at most this one
    report.save(out_dir / report_name)
    return report


# ---------------------------------------------------------------- filter


def filter_shards(shards: str | Path | list[str], out_dir: str | Path, svm, threshold: float = 0.5,
                  svm_id: str = "", progress: bool = True) -> CurationReport:
    """Keep the videos whose quality score (P(good) from `svm`, a QualitySVM) is >= `threshold`; each kept
    video's metadata gets its `quality`. Needs the shards' cached features of the SVM's feature model."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
    tag = svm.info.get("feature_tag")
    if not tag:
        raise ValueError("the quality SVM does not record its feature tag; train it with "
                         "vfusion3d-lightning fit --config configs/curation/quality.yaml")

    def process(shard: Path, out_shard: Path) -> dict[str, int]:
        table = read_features([str(shard)], tag)
        scores = dict(zip(table.keys, svm.score(table.quality.numpy()).tolist()))
        kept_samples, kept = [], []
        for raw in _raw_samples(shard):
            key = raw["__key__"]
            if "json" not in raw:  # filter reads only the metadata; decode_sample would say the same
                raise SampleError(f"sample {key!r} in {shard}: missing its .json metadata (files present: "
                                  f"{sorted(raw)})")
            if key not in scores:
                raise ValueError(f"sample {key!r} of {shard} has no cached features; encode the shard again "
                                 "(vfusion3d-lightning predict --config configs/curation/features.yaml "
                                 "--data.init_args.recompute true)")
            if scores[key] >= threshold:
                meta = json.loads(raw["json"])
                meta["quality"] = scores[key]
                kept_samples.append({**raw, "json": json.dumps(meta).encode()})
                kept.append(key)
        if kept:
            write_shard(out_shard, kept_samples, replace=True)
            _carry_features(shard, out_shard, table.keys, kept)
        return {"videos": len(scores), "kept": len(kept), "dropped": len(scores) - len(kept)}

    settings = {"threshold": threshold, "svm": svm_id, "feature_tag": tag}
    return _run(shards, out_dir, FILTER_REPORT, settings, process, "filter", progress)


# ---------------------------------------------------------------- label


def orbit_labels(elevation: float, num_views: int, size: int, radius: float) -> dict[str, np.ndarray]:
    """The cameras of a generated orbit from its estimated elevation: views 2*pi/n apart in azimuth from 0
    (the condition image's view), one elevation, looking at the origin from `radius`, as the renders."""
    from vfusion3d_lightning.cameras import orbit_azimuths, orbit_poses

    # orbit_poses needs an elevation strictly inside (-pi/2, pi/2)
    elevation = float(np.clip(elevation, -math.radians(89), math.radians(89)))
    intrinsics = default_intrinsics(size).matrix().numpy()
    return {"cam2world": orbit_poses(num_views, elevation, radius).numpy(),
            "intrinsics": np.repeat(intrinsics[None], num_views, axis=0),
            "elevations": np.full(num_views, elevation), "azimuths": orbit_azimuths(num_views).double().numpy()}


@dataclass
class Labellers:
    """What `label_shards` writes; None leaves that part of each sample as it is.

    elevation: an ElevationMLP (its config names the features it reads); masks: a mask method of
    preprocess.MASK_METHODS; quality: a QualitySVM to score videos not scored yet."""

    elevation: Any = None
    masks: str | None = "threshold"
    mask_tolerance: int = 12
    quality: Any = None
    radius: float = 1.5


def label_shards(shards: str | Path | list[str], out_dir: str | Path, labellers: Labellers,
                 settings_id: dict[str, str] | None = None, progress: bool = True) -> CurationReport:
    """Write each video with its elevation and orbit cameras, masks in its alpha channel (marked as estimated by
    the `mask_method` metadata key: schema.has_estimated_masks), and quality score. The RGB is kept as it is."""
    from vfusion3d_lightning.data.preprocess import foreground_masks

    if labellers.elevation is None and labellers.masks is None and labellers.quality is None:
        raise ValueError("nothing to label: give an elevation MLP, a mask method or a quality SVM")
    elevation_tag = labellers.elevation.config["feature_tag"] if labellers.elevation is not None else None
    quality_tag = labellers.quality.info.get("feature_tag") if labellers.quality is not None else None

    def estimates(shard: Path) -> tuple[dict[str, float], dict[str, float]]:
        tables = {tag: read_features([str(shard)], tag) for tag in {elevation_tag, quality_tag} - {None}}
        elevation, quality = {}, {}
        if elevation_tag is not None:
            table = tables[elevation_tag]
            with torch.no_grad():
                elevation = dict(zip(table.keys, labellers.elevation(table.elevation.float()).tolist()))
        if quality_tag is not None:
            table = tables[quality_tag]
            quality = dict(zip(table.keys, labellers.quality.score(table.quality.numpy()).tolist()))
        return elevation, quality

    def process(shard: Path, out_shard: Path) -> dict[str, int]:
        elevation, quality = estimates(shard)
        samples, keys, counts = [], [], {"videos": 0, "elevation": 0, "masks": 0, "quality": 0}
        for raw in read_raw_samples(shard):
            sample = decode_sample(raw)
            image_format = json.loads(raw["json"])["image_format"]
            counts["videos"] += 1
            if sample.key in elevation:
                size = sample.images.shape[1]
                for name, value in orbit_labels(elevation[sample.key], sample.num_views, size,
                                                labellers.radius).items():
                    setattr(sample, name, value)
                sample.extra["radius"] = labellers.radius
                counts["elevation"] += 1
            if labellers.masks is not None:
                sample.images[..., 3] = foreground_masks(sample.images[..., :3], labellers.masks,
                                                         labellers.mask_tolerance)
                sample.extra[MASK_METHOD_KEY] = labellers.masks  # marks the alpha as estimated: opacity loss only
                counts["masks"] += 1
            if sample.quality is None and sample.key in quality:
                sample.quality = quality[sample.key]
                counts["quality"] += 1
            samples.append(encode_sample(sample, image_format))
            keys.append(sample.key)
        if samples:
            write_shard(out_shard, samples, replace=True)
            _carry_features(shard, out_shard, keys, keys)
        return counts

    settings = {"elevation": (settings_id or {}).get("elevation"), "masks": labellers.masks,
                "mask_tolerance": labellers.mask_tolerance, "quality": (settings_id or {}).get("quality"),
                "radius": labellers.radius}
    return _run(shards, out_dir, LABEL_REPORT, settings, process, "label", progress)

