"""Curation features at scale: `FeatureExtractor.predict_step` encodes one shard at a time and caches the
averaged DINO features next to it (`data/feature_cache.py`), so `Trainer.predict` spreads shards over GPUs and a
rerun skips cached shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from vfusion3d_lightning.data.feature_cache import cache_path, feature_tag, shard_paths, write_features
from vfusion3d_lightning.data.schema import SampleError, decode_sample, read_raw_samples
from vfusion3d_lightning.io import on_white
from vfusion3d_lightning.models.curation.features import ELEVATION_VIEWS, QUALITY_FRAMES, DinoFeatures, curation_indices


class ShardFrames(Dataset):
    """One item per shard: its keys and the curation frames of each sample, (N, K, H, W, 4) uint8 RGBA."""

    def __init__(self, shards: list[Path], frames: list[int]):
        self.shards, self.frames = shards, frames

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard = self.shards[index]
        try:
            keys, frames = self._read(shard)
        except (OSError, ValueError) as err:  # a cut or foreign tar is already a ShardError (a SampleError)
            if isinstance(err, SampleError):
                raise
            raise SampleError(f"shard {shard} cannot be read ({type(err).__name__}: {err}); write it again or move "
                              "it out of the folder, then rerun (cached shards are skipped)") from err
        if not keys:
            raise SampleError(f"shard {shard} holds no samples")
        return {"shard": str(shard), "keys": keys, "frames": torch.stack(frames)}

    def _read(self, shard: Path) -> tuple[list[str], list[torch.Tensor]]:
        keys, frames = [], []
        needed = max(self.frames) + 1
        for raw in read_raw_samples(shard):
            def select(num_views: int) -> list[int]:
                if num_views < needed:
                    raise SampleError(f"sample {raw.get('__key__')!r} in {shard} has {num_views} views; curation "
                                      f"reads frames {self.frames} (orbits of 16 frames)")
                return self.frames
            sample = decode_sample(raw, select=select)
            if frames and sample.images.shape != frames[0].shape:  # a shard is encoded as one batch
                raise SampleError(f"sample {sample.key!r} in {shard} has {sample.images.shape[2]}x"
                                  f"{sample.images.shape[1]} frames, sample {keys[0]!r} {frames[0].shape[2]}x"
                                  f"{frames[0].shape[1]}; write each shard's videos at one size")
            keys.append(sample.key)
            frames.append(torch.from_numpy(sample.images))
        return keys, frames


class FeatureExtractor(L.LightningModule):
    """DINO features of curation frames, averaged per video, cached per shard (see the module docstring)."""

    def __init__(self, model_name: str = "vit_base_patch16_224.dino", weights: str | None = None,
                 random_init: bool = False, image_size: int = 224, pooling: str = "cls",
                 overrides: dict[str, Any] | None = None, num_frames: int = 16,
                 quality_frames: int = QUALITY_FRAMES, elevation_views: int = ELEVATION_VIEWS, chunk: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.features = DinoFeatures(model_name, weights, random_init, image_size, pooling, overrides).eval()
        self.frames, self.quality_slots, self.elevation_slots = curation_indices(
            num_frames, quality_frames, elevation_views)
        self.tag = feature_tag(model_name, pooling, random_init)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K, H, W, 4) uint8 RGBA -> (quality (N, D), elevation (N, D)) averaged features."""
        n, k = frames.shape[:2]
        flat = frames.flatten(0, 1)
        parts = []
        for part in flat.split(self.hparams.chunk):
            rgb = on_white(part.cpu().numpy()).to(self.device)
            parts.append(self.features(rgb))
        per_frame = torch.cat(parts).unflatten(0, (n, k))
        return per_frame[:, self.quality_slots].mean(1).cpu(), per_frame[:, self.elevation_slots].mean(1).cpu()

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        quality, elevation = self.encode(batch["frames"])
        write_features(batch["shard"], self.tag, batch["keys"], self.frames, quality, elevation)
        return {"shard": batch["shard"], "count": len(batch["keys"])}


class ShardFeaturesDataModule(L.LightningDataModule):
    """Shards to encode: each item is a whole shard; shards already cached for the model's tag are skipped."""

    def __init__(self, shards: str, num_workers: int = 2, recompute: bool = False):
        super().__init__()
        self.shards, self.num_workers, self.recompute = shards, num_workers, recompute

    def predict_dataloader(self) -> DataLoader:
        extractor = self.trainer.lightning_module if self.trainer is not None else None
        if not isinstance(extractor, FeatureExtractor):
            raise TypeError("ShardFeaturesDataModule feeds a FeatureExtractor (model.class_path "
                            "vfusion3d_lightning.training.FeatureExtractor)")
        todo = [p for p in shard_paths(self.shards)
                if self.recompute or not cache_path(p, extractor.tag).is_file()]
        return DataLoader(ShardFrames(todo, extractor.frames), batch_size=None, num_workers=self.num_workers)


def compute_features(shards: str | Path, extractor: FeatureExtractor, accelerator: str = "auto",
                     devices: int | str = "auto", num_workers: int = 2, progress: bool = True) -> None:
    """Cache the features of every shard that lacks them (Trainer.predict; one GPU or several)."""
    trainer = L.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False)
    trainer.predict(extractor, datamodule=ShardFeaturesDataModule(str(shards), num_workers), return_predictions=False)
