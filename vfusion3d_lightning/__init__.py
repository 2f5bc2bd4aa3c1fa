"""vfusion3d-lightning: VFusion3D (Meta, 2024) as a PyTorch Lightning model zoo."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LRM", "LRMConfig", "__version__"]

if TYPE_CHECKING:
    from vfusion3d_lightning.models.lrm import LRM, LRMConfig


def __getattr__(name: str):
    # imported on first use: the LRM pulls in timm and torchvision (2 s), which a rendering worker or a data
    # command never needs, yet every spawned process importing a submodule would pay
    if name in ("LRM", "LRMConfig"):
        from vfusion3d_lightning.models import lrm

        return getattr(lrm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
