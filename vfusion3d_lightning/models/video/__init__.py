"""Video diffusion backbones (diffusers) for the multi-view data engine."""

from .temporal import TEMPORAL_MODULES, temporal_parameter_names, train_temporal_only

__all__ = ["TEMPORAL_MODULES", "temporal_parameter_names", "train_temporal_only"]
