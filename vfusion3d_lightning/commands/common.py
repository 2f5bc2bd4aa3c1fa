"""What several commands share: the device, dtype and Trainer arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """`auto`: the GPU when there is one, else the CPU; any other value as given (`cpu`, `cuda`, `cuda:1`)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class PredictOptions:
    """Where a writing job's `Trainer.predict` runs, as Lightning's Trainer takes it: `--trainer.devices 8
    --trainer.num_nodes 4` spreads its shards over 32 GPUs (SLURM and torchrun as for training)."""

    accelerator: str = "auto"  # auto: the GPU if any, else the CPU
    devices: int | str | list[int] = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto: DDP's processes for several devices

    @classmethod
    def from_device(cls, device: str) -> PredictOptions:
        """One device named as torch names it: `auto`, `cpu`, `cuda`, `cuda:N`."""
        if device in ("auto", "cpu"):
            return cls(accelerator=device)
        kind, _, index = device.partition(":")
        if kind != "cuda" or not (index == "" or index.isdigit()):
            raise ValueError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
        return cls(accelerator="gpu", devices=[int(index)] if index else 1)
