"""Random draws of a training step that differ per DDP rank and per micro-batch and repeat on resume."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def run_seed(seed: int | None) -> int:
    """`seed`, or the run's `seed_everything` seed when None."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)


def draw_seed(seed: int, rank: int, step: int, micro_batch: int, stream: str) -> int:
    """The seed of one random draw of a training step: a hash of the run's seed, the global rank, the global
    (optimizer) step, the micro-batch within that step and the draw's name (e.g. "patch"). Every rank and every
    gradient-accumulation micro-batch draws its own numbers, and a run resumed at that step draws the same."""
    key = repr((int(seed), int(rank), int(step), int(micro_batch), str(stream))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1  # 63 bits: manual_seed


def step_seed(trainer: Any, seed: int, batch_idx: int, stream: str) -> int:
    """`draw_seed` of the draw `stream` of the training batch `batch_idx`: the trainer's global rank and global step
    and the micro-batch `batch_idx % accumulate_grad_batches` (Lightning's own count of the batches an optimizer step
    accumulates; it and the step are restored on resume). Without a trainer: rank 0, step 0."""
    rank, step = (trainer.global_rank, trainer.global_step) if trainer is not None else (0, 0)
    accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    return draw_seed(seed, rank, step, batch_idx % accumulate, stream)


def step_generator(trainer: Any, seed: int, batch_idx: int, stream: str,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with `step_seed`: for the draws the training step makes itself."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(trainer, seed, batch_idx, stream))
    return generator


@contextmanager
def step_global_rng(trainer: Any, seed: int, batch_idx: int, stream: str,
                    device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block with torch's global RNG (the CPU's, and `device`'s where it is a CUDA device) seeded with
    `step_seed`, and the global state as it was afterwards: for draws that layers make from the global RNG (the
    dropout inside a diffusers UNet), which a resumed run would not otherwise repeat (Lightning does not restore
    the global RNG, and validation and the data loaders move it differently in a resumed run)."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    value = step_seed(trainer, seed, batch_idx, stream)
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(value)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(value)
        yield
