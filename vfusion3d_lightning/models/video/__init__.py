"""Video diffusion backbones (diffusers) for the multi-view data engine."""

from vfusion3d_lightning.models.video.architectures import ARCHITECTURES
from vfusion3d_lightning.models.video.model import (
           HUB_IDS,
           SUPPORTED_UNETS,
           Conditioning,
           Conditions,
           VideoDiffusionModel,
)
from vfusion3d_lightning.models.video.objectives import EDMObjective, SchedulerObjective, objective_for
from vfusion3d_lightning.models.video.sampler import OrbitVideoPipeline, SamplerSettings
from vfusion3d_lightning.models.video.temporal import TEMPORAL_MODULES, temporal_parameter_names, train_temporal_only

__all__ = ["ARCHITECTURES", "HUB_IDS", "SUPPORTED_UNETS", "TEMPORAL_MODULES", "Conditioning", "Conditions",
           "EDMObjective", "OrbitVideoPipeline", "SamplerSettings", "SchedulerObjective", "VideoDiffusionModel",
           "objective_for", "temporal_parameter_names", "train_temporal_only"]
