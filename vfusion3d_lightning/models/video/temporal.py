"""Which parameters of a diffusers video UNet are temporal: the only ones VFusion3D fine-tunes."""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

# Module names (one component of a parameter's dotted path) that hold the temporal layers, per backbone
# (measured on diffusers 0.42 by listing the parameter names of tiny random configs of each class).
TEMPORAL_MODULES: dict[str, tuple[str, ...]] = {
    "UNetSpatioTemporalConditionModel": ("temporal_res_block", "temporal_transformer_blocks", "time_mixer",
                                         "time_pos_embed"),
    "I2VGenXLUNet": ("temp_attentions", "temp_convs", "transformer_in"),
    "UNet3DConditionModel": ("temp_attentions", "temp_convs", "transformer_in"),
}


def temporal_parameter_names(unet: nn.Module) -> list[str]:
    """Names of the temporal parameters of a supported video UNet."""
    kind = type(unet).__name__
    if kind not in TEMPORAL_MODULES:
        raise ValueError(f"no temporal-layer rule for {kind}; supported backbones: {sorted(TEMPORAL_MODULES)}")
    modules = set(TEMPORAL_MODULES[kind])
    return [name for name, _ in unet.named_parameters() if modules & set(name.split("."))]


def train_temporal_only(unet: nn.Module) -> tuple[int, int]:
    """Freeze every spatial parameter and unfreeze the temporal ones. -> (trainable, total) parameter counts."""
    temporal = set(temporal_parameter_names(unet))
    if not temporal:
        raise ValueError(f"{type(unet).__name__} has no temporal parameters under "
                         f"{TEMPORAL_MODULES[type(unet).__name__]}")
    trainable = total = 0
    for name, param in unet.named_parameters():
        param.requires_grad_(name in temporal)
        total += param.numel()
        trainable += param.numel() if name in temporal else 0
    log.info("%s: training %d temporal of %d parameters (%.1f%%)", type(unet).__name__, trainable, total,
             100 * trainable / total)
    return trainable, total
