"""The VFusion3D Large Reconstruction Model: encoder, transformer, triplane renderer, converters."""

from .config import LRMConfig
from .model import LRM
from .renderer import RenderOutput

__all__ = ["LRM", "LRMConfig", "RenderOutput"]
