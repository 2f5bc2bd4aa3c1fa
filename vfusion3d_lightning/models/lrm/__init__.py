"""The VFusion3D Large Reconstruction Model: encoder, transformer, triplane renderer, converters."""

from vfusion3d_lightning.models.lrm.config import LRMConfig
from vfusion3d_lightning.models.lrm.model import LRM
from vfusion3d_lightning.models.lrm.renderer import RenderOutput

__all__ = ["LRM", "LRMConfig", "RenderOutput"]
