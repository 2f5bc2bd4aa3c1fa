"""Cached curation features beside their shards, and shard metadata read without decoding images.

Cache file: `<shard stem>.features-<tag>.safetensors` beside `<shard>.tar`, with tensors
    quality    (N, D) mean features of the quality frames (8 uniformly spaced)
    elevation  (N, D) mean features of the elevation views (4 uniformly spaced)
and metadata `keys` (JSON list, the samples' order), `tag` and `frames`.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vfusion3d_lightning.data.datamodules import expand_shards
from vfusion3d_lightning.data.schema import check_tar_end, unreadable_shard
from vfusion3d_lightning.io import atomic_write


def shard_paths(shards: str | Path | list[str]) -> list[Path]:
    """A folder of shard .tar files, a glob/brace pattern, or a list of them -> shard paths (`expand_shards`)."""
    return [Path(p) for p in expand_shards(shards if isinstance(shards, list) else os.fspath(shards))]


def feature_tag(model_name: str, pooling: str = "cls", random_init: bool = False) -> str:
    """The cache name part for a feature model; random weights get their own tag so they never pass as DINO."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{model_name}-{pooling}") + ("-random" if random_init else "")


def cache_path(shard: str | Path, tag: str) -> Path:
    shard = Path(shard)
    return shard.with_name(f"{shard.name.removesuffix('.tar')}.features-{tag}.safetensors")


def write_features(shard: str | Path, tag: str, keys: list[str], frames: list[int], quality: torch.Tensor,
                   elevation: torch.Tensor) -> Path:
    metadata = {"keys": json.dumps(keys), "tag": tag, "frames": json.dumps(frames)}
    tensors = {"quality": quality.float().contiguous(), "elevation": elevation.float().contiguous()}
    return atomic_write(cache_path(shard, tag), lambda tmp: save_file(tensors, str(tmp), metadata))


@dataclass
class FeatureTable:
    """Cached features of many shards, row i belonging to keys[i] of shards[i]."""

    keys: list[str]
    shards: list[Path]
    quality: torch.Tensor  # (N, D)
    elevation: torch.Tensor  # (N, D)


def read_features(shards: str | Path | list[str], tag: str) -> FeatureTable:
    """The cached features of these shards; a clear error for a shard not encoded yet."""
    keys, owners, quality, elevation = [], [], [], []
    for shard in shard_paths(shards):
        path = cache_path(shard, tag)
        if not path.is_file():
            raise FileNotFoundError(
                f"no {tag} features for {shard} (expected {path}); encode the shards first: vfusion3d-lightning "
                f"predict --config configs/curation/features.yaml --data.init_args.shards {shard.parent}")
        with safe_open(str(path), "pt") as handle:
            shard_keys = json.loads(handle.metadata()["keys"])
            quality.append(handle.get_tensor("quality"))
            elevation.append(handle.get_tensor("elevation"))
        finite = torch.isfinite(quality[-1]).all(1) & torch.isfinite(elevation[-1]).all(1)
        if not finite.all():  # they would become NaN scores and NaN elevations, hence NaN cameras, downstream
            bad = [k for k, ok in zip(shard_keys, finite.tolist()) if not ok]
            raise ValueError(
                f"{path} holds NaN or inf features for samples {bad[:5]}; encode {shard} again: vfusion3d-lightning "
                f"predict --config configs/curation/features.yaml --data.init_args.shards {shard.parent} "
                "--data.init_args.recompute true")
        keys += shard_keys
        owners += [shard] * len(shard_keys)
    return FeatureTable(keys, owners, torch.cat(quality), torch.cat(elevation))


def read_metadata(shard: str | Path) -> dict[str, dict]:
    """key -> the sample's JSON metadata, reading only the .json members of the tar."""
    metadata = {}
    try:
        check_tar_end(shard)
    except tarfile.TarError as err:
        raise unreadable_shard(shard, err) from err
    with tarfile.open(shard) as tar:
        for member in tar:
            name = os.path.basename(member.name)
            if member.isfile() and name.endswith(".json") and name.count(".") == 1:
                metadata[name[:-5]] = json.loads(tar.extractfile(member).read())
    return metadata
