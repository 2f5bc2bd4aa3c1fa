"""QualityModule: trains the quality SVM under LightningCLI (one training step fits it on all labelled
videos), reports held-out accuracy, precision and recall, and writes the SVM as a skops file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from vfusion3d_lightning.io import run_log_dir
from vfusion3d_lightning.models.curation.quality import CHECKPOINT_KEY, QualitySVM


class QualityModule(L.LightningModule):
    """An sklearn SVM in a LightningModule, so that configs, sweeps and loggers treat it like every other model.
    At the end of fit the SVM is exported to `export_path` (default `<log dir>/quality_svm`), a
    `QualitySVM.save_pretrained` folder, which `vfusion3d-lightning filter` reads; `QualitySVM.from_pretrained`
    also reads this module's `.ckpt`."""

    def __init__(self, c_values: list[float] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0), kernel: str = "rbf",
                 folds: int = 5, seed: int = 0, threshold: float = 0.5, export_path: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.svm = QualitySVM(tuple(c_values), kernel, folds, seed)
        self.metrics: dict[str, float] = {}

    def configure_optimizers(self) -> None:
        return None  # nothing is trained by gradients

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, labels = batch
        # the tag the features were cached under, recorded so a scorer fed other features can say which to use
        tag = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("feature_tag", "")
        self.svm.fit(features.cpu().numpy(), labels.cpu().numpy(), tag)
        self.log("train/cv_balanced_accuracy", self.svm.info["cv_balanced_accuracy"])
        self.log("train/C", self.svm.info["C"])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if self.svm.pipeline is None:  # the sanity check runs before the fit
            return
        features, labels = batch
        self.metrics = self.svm.evaluate(features.cpu().numpy(), labels.cpu().numpy(), self.hparams.threshold)
        for name in ("accuracy", "precision", "recall"):
            self.log(f"val/{name}", self.metrics[name])

    def on_fit_end(self) -> None:
        if self.svm.pipeline is None or not self.trainer.is_global_zero:
            return
        path = Path(self.hparams.export_path or run_log_dir(self.trainer) / "quality_svm")
        self.svm.info["held_out"] = self.metrics
        self.export(path)
        rank_zero_info(f"quality SVM (C={self.svm.info['C']:g}, trained on {sum(self.svm.info['train_counts'])} "
                       f"videos) held-out {self.metrics} -> {path}")

    def export(self, directory: str | Path) -> Path:
        """`QualitySVM.save_pretrained` of the fitted SVM.

        Args:
            directory: the folder to write.
        """
        return self.svm.save_pretrained(directory)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.svm.pipeline is not None:
            checkpoint[CHECKPOINT_KEY] = self.svm._to_bytes()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY in checkpoint:  # checked as QualitySVM.from_pretrained checks a file: only its own types
            data = checkpoint[CHECKPOINT_KEY]
            if not isinstance(data, bytes):
                raise ValueError(f"the checkpoint's {CHECKPOINT_KEY!r} is a {type(data).__name__}, not the skops bytes "
                                 "QualityModule writes; give a checkpoint QualityModule wrote")
            self.svm = QualitySVM._from_bytes(data, "the checkpoint's quality SVM")
