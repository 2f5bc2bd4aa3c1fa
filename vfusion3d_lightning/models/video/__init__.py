"""Video diffusion backbones (diffusers) for the multi-view data engine."""

from .architectures import ARCHITECTURES
from .model import HUB_IDS, SUPPORTED_UNETS, Conditioning, Conditions, VideoDiffusionModel
from .objectives import EDMObjective, SchedulerObjective, objective_for
from .pipeline import OrbitVideoPipeline, SamplerSettings
from .temporal import TEMPORAL_MODULES, temporal_parameter_names, train_temporal_only

__all__ = ["ARCHITECTURES", "HUB_IDS", "SUPPORTED_UNETS", "TEMPORAL_MODULES", "Conditioning", "Conditions",
           "EDMObjective", "OrbitVideoPipeline", "SamplerSettings", "SchedulerObjective", "VideoDiffusionModel",
           "objective_for", "temporal_parameter_names", "train_temporal_only"]
