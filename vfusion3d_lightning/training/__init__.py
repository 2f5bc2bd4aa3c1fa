"""LightningModules: training recipes around the plain networks in `models/`."""

from vfusion3d_lightning.training.elevation import ElevationModule
from vfusion3d_lightning.training.features import FeatureExtractor
from vfusion3d_lightning.training.lrm import LRMModule
from vfusion3d_lightning.training.quality import QualityModule
from vfusion3d_lightning.training.video_diffusion import VideoDiffusionModule

__all__ = ["ElevationModule", "FeatureExtractor", "LRMModule", "QualityModule", "VideoDiffusionModule"]
