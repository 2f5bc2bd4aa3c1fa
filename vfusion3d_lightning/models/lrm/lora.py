"""LoRA adapters on the LRM through peft: add, save on their own, load, merge into the weights.

Low-rank adapters (Hu et al., 2021) on the transformer's attention and MLP layers let a fine-tune train a few
hundred thousand parameters of the released 452 M, with AdamW state to match. peft replaces each targeted
`nn.Linear` by its LoRA layer in place (the base weight stays, frozen, under `base_layer`), so the network runs
unchanged otherwise; `merge_lora` folds the adapters back into plain `nn.Linear` weights, which is what
`save_pretrained` writes and every loader of this project reads.

>>> add_lora(model, LoraOptions(rank=16))          # only adapter parameters train now
>>> save_lora(model, "adapter/")                   # adapter_model.safetensors + adapter_config.json (peft's)
>>> merge_lora(model).save_pretrained("finetuned/")  # plain weights again
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfusion3d_lightning.io import atomic_write, require_extra

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# the transformer's attention projections and MLP layers (module names relative to the LRM)
TRANSFORMER_LAYERS = (r"transformer\.blocks\.\d+\."
                      r"(cross_attn\.(to_q|to_k|to_v|to_out)|self_attn\.(to_qkv|to_out)|mlp\.(fc1|fc2))")


@dataclass(frozen=True)
class LoraOptions:
    """Where and how large the adapters are.

    Args:
        rank: the adapters' rank r.
        alpha: their scale is alpha / rank (peft's `lora_alpha`).
        dropout: dropout on the adapters' input.
        targets: a regular expression that the full names (relative to the LRM) of the `nn.Linear` layers to
            adapt match in whole; the default is every attention projection and MLP layer of the transformer.
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = TRANSFORMER_LAYERS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_value(cls, value: LoraOptions | dict | None) -> LoraOptions | None:
        if value is None or isinstance(value, cls):
            return value
        return cls(**value)


def _peft():
    return require_extra("peft", "lora", "LoRA fine-tuning")


def _lora_config(options: LoraOptions):
    return _peft().LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                              target_modules=options.targets, bias="none")


def add_lora(model: nn.Module, options: LoraOptions) -> nn.Module:
    """Put LoRA adapters on the layers of `model` that `options.targets` names, in place, and freeze every other
    parameter (peft's rule: only the adapters train). Returns `model`."""
    pattern = re.compile(options.targets)
    matched = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and pattern.fullmatch(name)]
    if not matched:
        raise ValueError(f"LoRA targets {options.targets!r} match no linear layer of the model; its linear layers "
                         f"are named like {_linear_examples(model)}")
    _peft().inject_adapter_in_model(_lora_config(options), model)
    return model


def _linear_examples(model: nn.Module, count: int = 4) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][:count]


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    """Whether `model` holds LoRA layers (peft imported only when it is installed)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return bool(_lora_layers(model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each LoRA layer's adapter into its base weight and put the plain layer back, in place: the model then
    computes what it computed with the adapters (to rounding) with no peft layer left. Returns `model`."""
    for name, layer in _lora_layers(model):
        layer.merge(safe_merge=True)  # raises on a non-finite merged weight rather than writing it
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights alone, under peft's names (`...to_q.lora_A.weight`)."""
    return _peft().get_peft_model_state_dict(model)


def save_lora(model: nn.Module, directory: str | os.PathLike, options: LoraOptions,
              base_model: str | None = None) -> Path:
    """Write the adapters of `model` alone into `directory` as peft does (`adapter_model.safetensors`,
    `adapter_config.json`), for `load_lora` on the same base weights. Returns the folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not state:
        raise ValueError("the model holds no LoRA adapters to save (add_lora first)")
    config: dict[str, Any] = _lora_config(options).to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    config["base_model_name_or_path"] = base_model
    config["vfusion3d_lora_options"] = asdict(options)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def load_lora(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the adapters saved by `save_lora` in `directory` to `model` (the base weights they were trained on)
    and load their weights. Returns `model`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_file, weights_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a LoRA adapter folder holds {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS} (written by save_lora or `vfusion3d-lightning export`)")
    config = json.loads(config_file.read_text())
    options = LoraOptions(**config.get("vfusion3d_lora_options") or {
        "rank": config["r"], "alpha": config["lora_alpha"], "dropout": config.get("lora_dropout", 0.0),
        "targets": config["target_modules"]})
    add_lora(model, options)
    state = load_file(str(weights_file))  # safetensors: tensors only, no code
    result = _peft().set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{weights_file} does not fit this model's adapters: missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]}; load it on the base model it was trained on")
    return model
