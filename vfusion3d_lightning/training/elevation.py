"""ElevationModule: trains the elevation MLP on averaged DINO features of 3D renders with known elevation and
reports the mean absolute error in degrees on held-out objects, next to the constant-mean baseline's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from vfusion3d_lightning.io import run_log_dir
from vfusion3d_lightning.models.curation.elevation import FEATURE_TAG_KEY, ElevationMLP

LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


class ElevationModule(L.LightningModule):
    """At the end of fit the MLP is exported to `export_path` (default `<log dir>/elevation_mlp`), an
    `ElevationMLP.save_pretrained` folder, which `vfusion3d-lightning label` reads; `ElevationMLP.from_pretrained`
    also reads this module's `.ckpt`."""

    def __init__(self, feature_dim: int = 768, hidden_dim: int = 512, dropout: float = 0.0,
                 loss: Literal["l1", "mse", "smooth_l1"] = "l1", lr: float = 1e-3, weight_decay: float = 1e-4,
                 export_path: str | None = None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
        self.save_hyperparameters()
        self.model = ElevationMLP(feature_dim, hidden_dim, dropout)
        self.register_buffer("baseline", torch.zeros(()))  # the training targets' mean, saved with the weights

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "training_features"):
            features = datamodule.training_features()
            if features.shape[1] != self.hparams.feature_dim:
                raise ValueError(f"features have {features.shape[1]} dimensions but feature_dim is "
                                 f"{self.hparams.feature_dim}; set model.init_args.feature_dim {features.shape[1]}")
            self.model.set_normalization(features.to(self.device))
            self.baseline.fill_(datamodule.training_targets().float().mean().item())
            self.model.config["feature_tag"] = datamodule.hparams.get("feature_tag", "")

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        path = Path(self.hparams.export_path or run_log_dir(self.trainer) / "elevation_mlp")
        self.export(path)
        rank_zero_info(f"elevation MLP -> {path}")

    def export(self, directory: str | Path) -> Path:
        """`ElevationMLP.save_pretrained` of the trained MLP.

        Args:
            directory: the folder to write.
        """
        return self.model.save_pretrained(directory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the features the MLP reads are the datamodule's, not a hyper-parameter: recorded for from_pretrained
        checkpoint[FEATURE_TAG_KEY] = self.model.config["feature_tag"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.model.config["feature_tag"] = checkpoint.get(FEATURE_TAG_KEY, "")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, D) -> elevation (B,) radians."""
        return self.model(features)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, elevation = batch
        loss = LOSSES[self.hparams.loss](self(features), elevation.float())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(features))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, elevation = batch
        error = (self(features) - elevation).abs().mean()
        baseline = (self.baseline - elevation).abs().mean()
        self.log("val/mae_deg", math.degrees(1) * error, prog_bar=True, batch_size=len(features))
        self.log("val/baseline_mae_deg", math.degrees(1) * baseline, batch_size=len(features))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
