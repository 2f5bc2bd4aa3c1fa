"""Video diffusion backbones (diffusers) for the multi-view data engine."""

from .backbone import HUB_IDS, TINY_CONFIGS, build_unet, load_unet
from .temporal import TEMPORAL_MODULES, temporal_parameter_names, train_temporal_only

__all__ = ["HUB_IDS", "TEMPORAL_MODULES", "TINY_CONFIGS", "build_unet", "load_unet", "temporal_parameter_names",
           "train_temporal_only"]
