"""What several commands share: the device and dtype arguments."""

from __future__ import annotations

from typing import Literal

import torch

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """`auto`: the GPU when there is one, else the CPU; any other value as given (`cpu`, `cuda`, `cuda:1`)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
