"""LightningModules: training recipes around the plain networks in `models/`."""

from .elevation import ElevationModule
from .features import FeatureExtractor
from .lrm import LRMModule
from .quality import QualityModule
from .video_diffusion import VideoDiffusionModule

__all__ = ["ElevationModule", "FeatureExtractor", "LRMModule", "QualityModule", "VideoDiffusionModule"]
