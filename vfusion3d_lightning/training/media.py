"""Validation images and videos for any logger: one call writes the file under the run's log folder (what a
CSVLogger, or any logger without media, keeps) and hands it to each logger that takes media:

- TensorBoardLogger: `add_image` (a video as `add_images`, its frames tiled into one image: TensorBoard's own
  video summary needs moviepy);
- WandbLogger: `log_image` / `log_video` (the MP4 file);
- MLFlowLogger: `log_image` / `log_artifact` (the MP4 file) into the run.

>>> log_image(trainer, "val/turntable", strip, "turntables")   # strip (H, W, 3) uint8
>>> log_video(trainer, "val/turntable_video", frames, "turntables", fps=8)   # frames (N, 3, H, W) in [0, 1]

Call them on global rank zero only (as validation code does), never inside a broadcast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from vfusion3d_lightning.io import atomic_write, require_extra, run_log_dir, to_uint8_images

# logger class -> (the package it needs, the extra that installs it): checked before a run starts
LOGGER_EXTRAS = {"WandbLogger": ("wandb", "wandb"), "MLFlowLogger": ("mlflow", "mlflow")}


def require_logger_extra(class_path: str) -> None:
    """A one-line error naming the pip line when the logger `class_path` needs a package that is missing."""
    name = class_path.rsplit(".", 1)[-1]
    if name in LOGGER_EXTRAS:
        module, extra = LOGGER_EXTRAS[name]
        require_extra(module, extra, f"the logger {name}")


def _media_path(trainer, folder: str, suffix: str) -> Path:
    return run_log_dir(trainer) / folder / f"epoch{trainer.current_epoch:03d}_step{trainer.global_step:07d}{suffix}"


def _artifact_name(key: str, step: int, suffix: str) -> str:
    return f"{key}/step{step:07d}{suffix}"


def log_image(trainer, key: str, image: np.ndarray, folder: str) -> Path:
    """Write `image` (H, W, 3) uint8 as `<log dir>/<folder>/epochE_stepS.png` and log it as `key` at the global
    step to every logger of `trainer` that takes images. Returns the PNG's path."""
    path = atomic_write(_media_path(trainer, folder, ".png"), lambda tmp: Image.fromarray(image).save(tmp,
                                                                                                      format="PNG"))
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, artifact_file=_artifact_name(key, step, ".png"))
    return path


def log_video(trainer, key: str, frames: torch.Tensor, folder: str, fps: int = 8) -> Path:
    """Write `frames` (N, 3, H, W) in [0, 1] as `<log dir>/<folder>/epochE_stepS.mp4` and log it as `key` at the
    global step to every logger of `trainer` that takes media. Returns the MP4's path."""
    from vfusion3d_lightning.inference import write_video

    path = write_video(frames, _media_path(trainer, folder, ".mp4"), fps)
    step = trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_images(key, to_uint8_images(frames), step, dataformats="NHWC")
        elif isinstance(logger, WandbLogger):
            logger.log_video(key=key, videos=[str(path)], step=step, format=["mp4"])
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=key)
    return path
