"""Camera noise during training (the paper: uniform in [-0.02, 0.02] on intrinsics and extrinsics)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..cameras import add_camera_noise


class CameraNoise(Callback):
    """Adds uniform noise to the batch's `source_camera` and/or `render_cameras` in training steps only.

    Seeded by (seed, global step, rank): a rerun or a resumed run draws the same noise."""

    def __init__(self, scale: float = 0.02, source: bool = True, render: bool = True, seed: int = 0):
        if scale < 0:
            raise ValueError(f"camera noise scale must be >= 0, got {scale}")
        self.scale, self.source, self.render, self.seed = scale, source, render, seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        keys = [k for k, on in (("source_camera", self.source), ("render_cameras", self.render)) if on]
        for offset, key in enumerate(keys):
            camera = batch[key]
            generator = torch.Generator(device=camera.device)
            generator.manual_seed(hash((self.seed, trainer.global_step, trainer.global_rank, offset)) % 2**63)
            batch[key] = add_camera_noise(camera, self.scale, generator)
