"""Writing outputs: files that are never half-written under their final name, images as uint8."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`.

    The temporary name keeps `path`'s suffix, for writers that pick a format by it. A crash leaves the
    old file (if any) in place; parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; outputs get the permissions open() would give
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Images (..., 3, H, W) in [0, 1] -> (..., H, W, 3) uint8, rounded."""
    pixels = images.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy()
    return (pixels * 255).round().astype(np.uint8)


def on_white(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 4) uint8 RGBA -> (N, 3, H, W) floats in [0, 1], composited on white."""
    rgba = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])


def run_log_dir(trainer) -> Path:
    """A Lightning run's log folder, as Trainer.log_dir gives it but without its broadcast: every rank must
    join that broadcast, so rank-zero-only code that asks Trainer.log_dir hangs a multi-process run."""
    logger = trainer.logger
    directory = None
    if logger is not None:
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return Path(directory or trainer.default_root_dir)
