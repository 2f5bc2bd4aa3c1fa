"""Cached curation features with their targets, for the quality SVM (hand labels) and the elevation MLP
(elevations of 3D renders)."""

from __future__ import annotations

from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from vfusion3d_lightning.data.datamodules import EpochDataLoader, EpochShuffle, trainer_progress
from vfusion3d_lightning.data.feature_cache import read_features, read_metadata, shard_paths
from vfusion3d_lightning.data.labels import read_labels

Target = Literal["quality", "elevation"]


def _in_key_order(keys: list[str], rows: list[int]) -> list[int]:
    # rows by sample key, not by place in the shards: a resumed render or curation run can put the same videos
    # in other shards, and the seeded validation split must pick the same ones from any layout
    return sorted(rows, key=keys.__getitem__)


def labelled_quality(shards: str, tag: str, labels_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quality features of the labelled videos in these shards: (N, D) and labels (N,)."""
    table, labels = read_features(shards, tag), read_labels(labels_path)
    rows = _in_key_order(table.keys, [i for i, key in enumerate(table.keys) if key in labels])
    if not rows:
        raise ValueError(f"none of the {len(table.keys)} videos in {shards} has a label in {labels_path}")
    return table.quality[rows], torch.tensor([labels[table.keys[i]] for i in rows])


def render_elevations(shards: str, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Elevation features of samples with known elevation: (N, D) and elevation of view 0 in radians (N,)."""
    table = read_features(shards, tag)
    elevation = {}
    for shard in shard_paths(shards):
        for key, meta in read_metadata(shard).items():
            if meta.get("elevations"):
                elevation[key] = float(meta["elevations"][0])
    rows = _in_key_order(table.keys, [i for i, key in enumerate(table.keys) if key in elevation])
    if not rows:
        raise ValueError(f"no sample in {shards} has elevations; the elevation MLP trains on 3D renders")
    return table.elevation[rows], torch.tensor([elevation[table.keys[i]] for i in rows], dtype=torch.float32)


class CurationDataModule(L.LightningDataModule):
    """Features and targets in memory. `target` "quality": hand labels from `labels`, the whole training set as
    one batch (an SVM fits in one step); "elevation": ground-truth elevations, mini-batches. Validation is
    `val_shards` (held-out objects) or, without it, a `val_fraction` split (stratified for quality)."""

    def __init__(self, train_shards: str, feature_tag: str, target: Target = "quality", labels: str | None = None,
                 val_shards: str | None = None, val_fraction: float = 0.2, batch_size: int = 256, seed: int = 0):
        super().__init__()
        if target not in ("quality", "elevation"):
            raise ValueError(f"target must be 'quality' or 'elevation', got {target!r}")
        if target == "quality" and labels is None:
            raise ValueError("the quality target needs a labels file (labels: path/to/labels.jsonl)")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _load(self, shards: str) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        if hp.target == "quality":
            features, targets = labelled_quality(shards, hp.feature_tag, hp.labels)
        else:
            features, targets = render_elevations(shards, hp.feature_tag)
        return features.float(), targets

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        features, targets = self._load(hp.train_shards)
        if hp.val_shards:
            val_features, val_targets = self._load(hp.val_shards)
        else:
            val_rows = self._split(targets)
            train = np.setdiff1d(np.arange(len(targets)), val_rows)
            val_features, val_targets = features[val_rows], targets[val_rows]
            features, targets = features[train], targets[train]
        self.train_set = TensorDataset(features, targets)
        self.val_set = TensorDataset(val_features, val_targets)

    def _split(self, targets: torch.Tensor) -> np.ndarray:
        rng = np.random.default_rng(self.hparams.seed)
        groups = [np.flatnonzero(targets.numpy() == c) for c in (0, 1)] if self.hparams.target == "quality" \
            else [np.arange(len(targets))]
        rows = []
        for group in groups:
            count = int(round(len(group) * self.hparams.val_fraction))
            if len(group) and not 0 < count < len(group):
                raise ValueError(f"val_fraction {self.hparams.val_fraction} of {len(group)} samples leaves no "
                                 "training or validation samples; label more videos or give val_shards")
            rows.append(rng.permutation(group)[:count])
        return np.sort(np.concatenate(rows))

    def train_dataloader(self) -> DataLoader:
        if self.hparams.target == "quality":
            return DataLoader([self.train_set.tensors], batch_size=None)
        # the order is a function of (seed, epoch) and the loader resumes mid-epoch: a killed fit goes on exactly
        return EpochDataLoader(self.train_set, trainer_progress(self), batch_size=self.hparams.batch_size,
                               sampler=EpochShuffle(len(self.train_set), self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        if self.hparams.target == "quality":
            return DataLoader([self.val_set.tensors], batch_size=None)
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size)

    def training_targets(self) -> torch.Tensor:
        self.setup()
        return self.train_set.tensors[1]

    def training_features(self) -> torch.Tensor:
        self.setup()
        return self.train_set.tensors[0]
