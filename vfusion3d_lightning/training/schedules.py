"""Learning-rate schedules."""

from __future__ import annotations

import bisect
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosineRestarts(LRScheduler):
    """Linear warm-up, then cosine annealing that restarts from the initial LR at `restart_steps`.

    The factor is a pure function of the step, so a resumed run continues on the same curve. Step it
    once per optimizer step. Cycles: [0, r1), [r1, r2), ..., [rk, total_steps); each anneals from the
    base LR to `min_lr_ratio` x base LR. Warm-up covers the first `warmup_steps` of the first cycle.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                 restart_steps: list[int] | tuple[int, ...] = (), min_lr_ratio: float = 0.0, last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps}, {min_lr_ratio}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.restart_steps = sorted(s for s in set(restart_steps) if 0 < s < total_steps)
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        starts = [0, *self.restart_steps]
        cycle = bisect.bisect_right(starts, step) - 1
        start = starts[cycle]
        end = starts[cycle + 1] if cycle + 1 < len(starts) else self.total_steps
        progress = min(1.0, (step - start) / max(1, end - start))
        cosine = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return cosine * warmup

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
