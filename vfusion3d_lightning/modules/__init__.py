"""LightningModules: training recipes around the plain networks in `models/`."""

from .lrm import LRMModule
from .video_diffusion import VideoDiffusionModule

__all__ = ["LRMModule", "VideoDiffusionModule"]
