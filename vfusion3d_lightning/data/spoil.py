"""Bad orbit videos made from good ones, the ways generated orbits fail: labels for a quality classifier when
no hand labels exist yet (the quickstart pipeline, tests). Hand labels of real generated videos are better."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

SPOIL_KINDS = ("switch", "blur", "noise", "blotches")


def spoil_video(images: np.ndarray, other: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A bad copy of a good video (N, H, W, 4) uint8 RGBA: `switch` shows `other` (another object's video, same
    shape) from the middle on, `blur` and `noise` degrade every frame, `blotches` paints coloured squares."""
    if kind not in SPOIL_KINDS:
        raise ValueError(f"kind must be one of {SPOIL_KINDS}, got {kind!r}")
    out = images.copy()
    n, size = images.shape[0], images.shape[1]
    if kind == "switch":
        out[n // 2:] = other[n // 2:]
    elif kind == "blur":
        for i in range(n):
            out[i] = np.asarray(Image.fromarray(out[i], "RGBA").filter(ImageFilter.GaussianBlur(size / 10)))
    elif kind == "noise":
        rgb = out[..., :3].astype(np.float32) + rng.normal(0, 60, out[..., :3].shape)
        out[..., :3] = np.clip(rgb, 0, 255).astype(np.uint8)
        out[..., 3] = 255
    else:
        for i in range(n):
            for _ in range(3):
                y, x = rng.integers(0, size - size // 4, 2)
                out[i, y:y + size // 4, x:x + size // 4] = [*rng.integers(0, 255, 3), 255]
    return out
