"""DINO image features (timm) for curating generated videos, and the frames each curation model looks at.

The paper averages the DINO features of 8 uniformly spaced frames for the quality classifier and of 4 uniformly
spaced views for the elevation estimator. On a 16-frame orbit both sets are evenly spaced in azimuth
(every 45 and every 90 degrees), and the 4 views are a subset of the 8, so one pass over 8 frames gives both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vfusion3d_lightning import hub
from vfusion3d_lightning.models.lrm.encoder import IMAGENET_MEAN, IMAGENET_STD

POOLINGS = ("cls", "mean", "cls+mean")
QUALITY_FRAMES = 8
ELEVATION_VIEWS = 4


def uniform_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices evenly spaced over an orbit of `num_frames` (0, n/count, 2n/count, ...)."""
    if not 1 <= count <= num_frames:
        raise ValueError(f"cannot pick {count} uniformly spaced frames from {num_frames}")
    return [i * num_frames // count for i in range(count)]


def curation_indices(num_frames: int, quality_frames: int = QUALITY_FRAMES,
                     elevation_views: int = ELEVATION_VIEWS) -> tuple[list[int], list[int], list[int]]:
    """(frames to encode, positions of the quality frames in them, positions of the elevation views in them)."""
    quality = uniform_indices(num_frames, quality_frames)
    elevation = uniform_indices(num_frames, elevation_views)
    frames = sorted(set(quality) | set(elevation))
    return frames, [frames.index(i) for i in quality], [frames.index(i) for i in elevation]


def _create_backbone(model_name: str, image_size: int, overrides: dict[str, Any]) -> nn.Module:
    try:
        # ViTs fix their position embeddings to the input size
        return timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size, **overrides)
    except TypeError:  # CNNs take any size and have no such argument
        return timm.create_model(model_name, pretrained=False, num_classes=0, **overrides)


def _timm_source(model_name: str) -> str:
    return f"https://huggingface.co/timm/{model_name} (file model.safetensors)"


def _no_weights_error(model_name: str) -> FileNotFoundError:
    """The missing-weights error of a DinoFeatures built without weights: the registry's file when an entry holds
    that model, else a file of its own under the checkpoint dir."""
    entries = [e for e in hub.load_registry().values() if e.converter == "timm" and e.config == model_name]
    if entries:
        source, file, name = entries[0].source, entries[0].filename, entries[0].name
        how = f"then pass weights={name!r} (its registry name) or the file's path"
    else:
        source, file, name = _timm_source(model_name), f"{model_name}/model.safetensors", None
        how = "then pass weights=<that file>"
    return hub.missing_weights_error(f"DINO weights of {model_name!r} (no weights given)", source,
                                     hub.checkpoint_dir() / file, f"{how}; random_init=True builds random weights, "
                                                                  "for tests only")


class DinoFeatures(nn.Module):
    """A DINO ViT from timm: RGB in [0, 1] (B, 3, H, W) -> features (B, D).

    Other timm backbones work too (another self-supervised ViT, or a CNN, whose feature map is averaged:
    pooling "mean"); the paper uses DINO.

    `weights`: a local weights file (safetensors, or a torch file of tensors) with timm's names, or a name in
    checkpoints/registry.yaml. Without weights the model refuses to build unless `random_init` is set, which
    is for tests and smoke runs only: random features are not DINO features.
    """

    def __init__(self, model_name: str = "vit_base_patch16_224.dino", weights: str | Path | None = None,
                 random_init: bool = False, image_size: int = 224, pooling: str = "cls",
                 overrides: dict[str, Any] | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if weights is None and not random_init:
            raise _no_weights_error(model_name)
        try:
            self.backbone = _create_backbone(model_name, image_size, overrides or {})
        except RuntimeError as err:  # timm raises RuntimeError for unknown names
            raise ValueError(f"timm cannot build feature model {model_name!r}: {err}") from err
        self.is_vit = hasattr(self.backbone, "num_prefix_tokens")
        if not self.is_vit and pooling != "mean":
            raise ValueError(f"{model_name} has a feature map, not tokens: use pooling 'mean' (got {pooling!r})")
        if weights is not None:
            _, path = hub.locate_weights(weights, what=f"DINO weights of {model_name!r}", converters=("timm",),
                                         fetch=_timm_source(model_name))
            self.load_timm_state(hub.load_state_file(path), str(path))
        self.model_name, self.image_size, self.pooling = model_name, image_size, pooling
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_timm_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        # classifier heads are not features; anything else missing or extra means the wrong model
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.head"))}
        result = self.backbone.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            architecture = self.backbone.default_cfg.get("architecture", type(self.backbone).__name__)
            raise ValueError(
                f"{source} does not fit timm's {architecture}: "
                f"missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}; pass the model_name "
                "the weights were trained as (e.g. vit_small_patch16_224.dino for DINO ViT-S/16)")

    @property
    def feature_dim(self) -> int:
        return self.backbone.num_features * (2 if self.pooling == "cls+mean" else 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DinoFeatures expects RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        x = (x - self.mean) / self.std
        tokens = self.backbone.forward_features(x.to(next(self.backbone.parameters()).dtype)).float()
        if not self.is_vit:  # (B, C, h, w) feature map
            return tokens.mean((2, 3))
        prefix = self.backbone.num_prefix_tokens
        cls, patches = tokens[:, 0], tokens[:, prefix:].mean(1)
        if self.pooling == "cls":
            return cls
        if self.pooling == "mean":
            return patches
        return torch.cat([cls, patches], dim=-1)
