"""LightningModules: training recipes around the plain networks in `models/`."""

from .lrm import LRMModule

__all__ = ["LRMModule"]
