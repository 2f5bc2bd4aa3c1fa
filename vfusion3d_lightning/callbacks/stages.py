"""The paper's multi-stage schedule: render resolution by epoch, and an LR restart at a stage switch."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


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
