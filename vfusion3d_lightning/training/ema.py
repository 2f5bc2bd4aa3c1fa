"""Exponential moving average of the trained parameters only (frozen weights need no copy)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ParameterEMA:
    """Shadow copies (fp32) of the parameters that require grad. The decay ramps up as
    min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the initial weights."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, param in module.named_parameters() if param.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {name: params[name].detach().float().clone() for name in self.names}
        self.updates = 0

    def _params(self, module: nn.Module) -> list[nn.Parameter]:
        params = dict(module.named_parameters())
        return [params[name] for name in self.names]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadows = [self.shadow[name] for name in self.names]
        current = [param.detach().float() for param in self._params(module)]
        torch._foreach_lerp_(shadows, current, 1.0 - decay)

    def to(self, device: torch.device) -> "ParameterEMA":
        self.shadow = {name: tensor.to(device) for name, tensor in self.shadow.items()}
        return self

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Run with the averaged weights in `module`, then put the trained ones back."""
        params = self._params(module)
        saved = [param.detach().clone() for param in params]
        with torch.no_grad():
            for param, name in zip(params, self.names):
                param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} trained parameters, e.g. {sorted(missing)[:3]}")
        device = next(iter(self.shadow.values())).device if self.shadow else torch.device("cpu")
        self.shadow = {name: state["shadow"][name].float().to(device) for name in self.names}
        self.updates = int(state["updates"])
