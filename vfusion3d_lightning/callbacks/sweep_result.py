"""SweepResult: what a sweep trial reports back to `vfusion3d-lightning sweep` (see sweep.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from ..io import atomic_write, run_log_dir
from ..sweep import RESULT_FILE


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

    def __init__(self, filename: str = RESULT_FILE):
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
