"""Build a video UNet from a local diffusers folder or from a config (tiny random ones for tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
from torch import nn

from .temporal import TEMPORAL_MODULES

# Known public checkpoints whose UNet class we support; weights are never downloaded at run time.
HUB_IDS = {
    "UNetSpatioTemporalConditionModel": "stabilityai/stable-video-diffusion-img2vid-xt",
    "I2VGenXLUNet": "ali-vilab/i2vgen-xl",
    "UNet3DConditionModel": "ali-vilab/text-to-video-ms-1.7b",
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "UNetSpatioTemporalConditionModel": dict(
        sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4),
        projection_class_embeddings_input_dim=3 * 8, addition_time_embed_dim=8, num_frames=16),
    "I2VGenXLUNet": dict(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, num_attention_heads=4, norm_num_groups=32),
    "UNet3DConditionModel": dict(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
}


def _unet_class(kind: str) -> type[nn.Module]:
    if kind not in TEMPORAL_MODULES:
        raise ValueError(f"unsupported video UNet {kind!r}; choose one of {sorted(TEMPORAL_MODULES)}")
    return getattr(diffusers, kind)


def build_unet(kind: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised UNet of class `kind` from `config` (default: the tiny test config)."""
    return _unet_class(kind)(**(TINY_CONFIGS[kind] if config is None else config))


def load_unet(kind: str, folder: str | Path, subfolder: str | None = "unet") -> nn.Module:
    """A pretrained UNet from a local diffusers folder (a pipeline folder with `unet/`, or a UNet folder)."""
    folder = Path(folder)
    unet_dir = folder / subfolder if subfolder and (folder / subfolder).is_dir() else folder
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no diffusers UNet at {unet_dir} (config.json missing). Download {HUB_IDS[kind] if kind in HUB_IDS else kind} "
            f"with `huggingface-cli download {HUB_IDS.get(kind, '<repo>')} --local-dir {folder}` on a machine with "
            "network access and point to that folder"
        )
    return _unet_class(kind).from_pretrained(unet_dir)
