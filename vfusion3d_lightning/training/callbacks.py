"""Training callbacks: the paper's multi-stage schedule (render resolution by epoch, an LR restart at a stage
switch), camera noise, and the result file a sweep trial reports back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vfusion3d_lightning.cameras import add_camera_noise
from vfusion3d_lightning.io import atomic_write, run_log_dir

SWEEP_RESULT_FILE = "sweep_result.json"


class ResolutionStages(Callback):
    """Sets the LRM's render resolution by epoch: `resolutions[i]` for `epochs[i]` epochs, the last stage
    lasting for the rest of training. The stage follows from the epoch, so a resumed run is in the right one."""

    def __init__(self, resolutions: list[int] = [128, 192, 256, 320, 384], epochs: list[int] = [5, 5, 5, 5, 10]):
        if len(resolutions) != len(epochs) or not resolutions:
            raise ValueError(f"need one epoch count per resolution, got {resolutions} and {epochs}")
        if min(resolutions) < 1 or min(epochs) < 1:
            raise ValueError(f"resolutions and epochs must be positive, got {resolutions} and {epochs}")
        self.resolutions, self.epochs = list(resolutions), list(epochs)

    def stage_at(self, epoch: int) -> int:
        end = 0
        for index, length in enumerate(self.epochs):
            end += length
            if epoch < end:
                return index
        return len(self.epochs) - 1

    def resolution_at(self, epoch: int) -> int:
        return self.resolutions[self.stage_at(epoch)]

    def end_epoch_of(self, resolution: int) -> int:
        """The first epoch after the stage at `resolution`."""
        if resolution not in self.resolutions:
            raise ValueError(f"no stage renders at {resolution}; stages: {self.resolutions}")
        return sum(self.epochs[: self.resolutions.index(resolution) + 1])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # per batch, not per epoch: a run resumed mid-epoch gets no epoch-start hook for that epoch
        pl_module.render_size = self.resolution_at(trainer.current_epoch)
        pl_module.log("train/render_size", float(pl_module.render_size), on_step=True, on_epoch=False)


class LRRestartAtStage(Callback):
    """Restarts the cosine LR schedule when the stage at `after_resolution` ends (the paper: after 192).

    Works with `ResolutionStages` in the same trainer; it sets the module's `restart_epochs` before the
    optimizer and its scheduler are built."""

    def __init__(self, after_resolution: int = 192):
        self.after_resolution = after_resolution

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stages = [c for c in trainer.callbacks if isinstance(c, ResolutionStages)]
        if len(stages) != 1:
            raise ValueError(f"LRRestartAtStage needs exactly one ResolutionStages callback, found {len(stages)}")
        if not hasattr(pl_module, "restart_epochs"):
            raise TypeError(f"{type(pl_module).__name__} has no restart_epochs; LRRestartAtStage drives LRMModule")
        pl_module.restart_epochs = [stages[0].end_epoch_of(self.after_resolution)]


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


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """Trainer.callback_metrics -> {name: float}, scalars only."""
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError, RuntimeError):  # a tensor with more than one element, or not a number
            continue
    return out


class SweepResult(L.Callback):
    """Writes `<default_root_dir>/sweep_result.json` (atomically) when `fit` ends: the logged metrics (floats)
    after every validation (`history`, sanity check excluded) and at the end (`metrics`), the log folder and the
    checkpoints. Nothing is written when fit is interrupted or fails, so the sweep sees an unfinished trial."""

    def __init__(self, filename: str = SWEEP_RESULT_FILE):
        self.filename = filename
        self.history: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                 "metrics": scalar_metrics(trainer.callback_metrics)})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        result = {
            "metrics": scalar_metrics(trainer.callback_metrics),
            "history": self.history,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "log_dir": str(run_log_dir(trainer)),
            "checkpoints": {"best": getattr(checkpoint, "best_model_path", "") or None,
                            "last": getattr(checkpoint, "last_model_path", "") or None},
        }
        text = json.dumps(result, indent=2)
        atomic_write(Path(trainer.default_root_dir) / self.filename, lambda tmp: tmp.write_text(text))

    def state_dict(self) -> dict[str, Any]:  # a trial resumed from a checkpoint keeps its earlier validations
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
