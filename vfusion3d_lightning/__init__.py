"""vfusion3d-lightning: VFusion3D (Meta, 2024) as a PyTorch Lightning model zoo."""

from vfusion3d_lightning.models.lrm import LRM, LRMConfig

__version__ = "0.1.0"
__all__ = ["LRM", "LRMConfig", "__version__"]
