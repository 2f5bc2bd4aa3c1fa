"""DINOv2 image encoder built by timm, with the released model's position-embedding resampling."""

from __future__ import annotations

import math
from typing import Any

import timm
import torch
from torch import nn

from vfusion3d_lightning.models.lrm.transformer import checkpoint_block

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resample_patch_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resample square patch position embeddings to a grid_h x grid_w grid as the released model ran.

    pos_embed: (1, G*G, D) -> (1, grid_h*grid_w, D). Bicubic in float32 whatever the autocast, align_corners
    False, and by *scale factor* (grid + 0.1) / G (transformers' Dinov2 of 2024), which samples slightly
    different source positions than resampling to the target size does. Applied as two `bicubic_matrix`
    products, equal to `F.interpolate` (tests/models/test_lrm_convert.py).
    """
    num_positions = pos_embed.shape[1]
    side = int(math.isqrt(num_positions))
    if side * side != num_positions:
        raise ValueError(f"patch position embeddings must form a square grid, got {num_positions} positions")
    if side == grid_h == grid_w:
        return pos_embed
    rows = bicubic_matrix(side, grid_h, (grid_h + 0.1) / side, pos_embed.device)
    cols = bicubic_matrix(side, grid_w, (grid_w + 0.1) / side, pos_embed.device)
    with torch.autocast(pos_embed.device.type, enabled=False):
        grid = pos_embed[0].float().reshape(side, side, -1)
        resampled = torch.einsum("ij,jkc,lk->ilc", rows, grid, cols)
    return resampled.reshape(1, grid_h * grid_w, -1).to(pos_embed.dtype)


def bicubic_matrix(size_in: int, size_out: int, scale: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """One axis of `F.interpolate(mode="bicubic", align_corners=False, scale_factor=scale)` as a matrix
    (size_out, size_in) float32: PyTorch's cubic convolution (A = -0.75) with edge taps clamped.

    `resample_patch_pos_embed` applies it on both axes; as two small matrix products it takes
    microseconds, where the bicubic kernel, which loops over 768 channels in each of 1,296 threads, took 7 ms
    of a 40 ms image -> planes on an H100. Built from tensor ops, it also compiles into one graph.
    """
    a = -0.75
    source = (torch.arange(size_out, device=device, dtype=torch.float32) + 0.5) / scale - 0.5
    base = torch.floor(source)
    offsets = torch.arange(-1, 3, device=device, dtype=torch.float32)
    distance = (source - base)[:, None] - offsets  # (size_out, 4) from each of the 4 taps
    x = distance.abs()
    weights = torch.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a)
    taps = (base[:, None] + offsets).long().clamp(0, size_in - 1)
    return torch.zeros(size_out, size_in, device=device).scatter_add_(1, taps, weights)


class DinoEncoder(nn.Module):
    """DINOv2 ViT: RGB in [0, 1] (B, 3, H, W) -> all tokens after the final norm (B, 1 + h*w, D).

    ImageNet normalisation is applied here; no resize or crop (a side that is not a multiple of the
    patch size loses its remainder, as in the released model).
    """

    def __init__(self, model_name: str = "vit_base_patch14_dinov2", overrides: dict[str, Any] | None = None):
        super().__init__()
        try:
            self.vit = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                                         **(overrides or {}))
        except RuntimeError as err:  # timm raises RuntimeError for unknown names
            raise ValueError(f"timm cannot build encoder {model_name!r}: {err}") from err
        if getattr(self.vit, "num_prefix_tokens", 1) != 1 or getattr(self.vit, "no_embed_class", False):
            raise ValueError(
                f"encoder {model_name!r} must have one class token and class position embedding (DINOv2 without "
                "registers, e.g. vit_base_patch14_dinov2)"
            )
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.gradient_checkpointing: bool | str = False  # False, True or "selective" (checkpoint_block)

    @property
    def feature_dim(self) -> int:
        return self.vit.embed_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"encoder expects RGB images (B, 3, H, W), got shape {tuple(image.shape)}")
        if min(image.shape[-2:]) < self.patch_size:
            raise ValueError(f"image {tuple(image.shape[-2:])} is smaller than one {self.patch_size}px patch")
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        # a stride-p convolution ignores the last H % p rows and W % p columns (512 -> 36 patches of 14)
        p = self.patch_size
        x = x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p]
        x = self.vit.patch_embed(x)  # (B, h, w, D): dynamic_img_size makes timm keep the grid
        batch, grid_h, grid_w, dim = x.shape
        pos = self.vit.pos_embed
        patch_pos = resample_patch_pos_embed(pos[:, 1:], grid_h, grid_w)
        cls = (self.vit.cls_token + pos[:, :1]).expand(batch, -1, -1)
        x = torch.cat([cls, x.reshape(batch, grid_h * grid_w, dim) + patch_pos], dim=1)
        x = self.vit.norm_pre(x)
        for block in self.vit.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint_block(block, x, selective=self.gradient_checkpointing == "selective")
            else:
                x = block(x)
        return self.vit.norm(x)
