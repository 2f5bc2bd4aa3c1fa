"""A field with a known surface written into an LRM's decoder and planes: a sphere.

Random weights make fog of the same density everywhere, which hides what empty-space skipping and meshing
do on a real object; benchmarks and tests use this field at any model size instead.

>>> planes = write_sphere(model, radius=0.5)   # sets model.decoder in place; planes (1, 3, C, H, W)
>>> out = model.render(planes, turntable_cameras(8)[None], 64)
"""

from __future__ import annotations

import math

import torch

from vfusion3d_lightning.models.lrm.model import LRM

STEEPNESS = 60.0  # raw density falls by this much per unit of r^2: a crisp surface, as trained fields have


@torch.no_grad()
def write_sphere(model: LRM, radius: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Set `model.decoder` so that planes from this function hold a sphere of activated density 1 at
    `radius`, rising inside and falling to about 1e-6 at the box's faces; colours are grey with small
    random variation. Returns the planes (1, 3, C, H, W) on the model's device.
    """
    if not 0 < radius < model.config.box_size / 2:
        raise ValueError(f"radius must be inside the box (0, {model.config.box_size / 2}), got {radius}")
    generator = torch.Generator().manual_seed(seed)
    channels, size = model.config.triplane_dim, model.config.triplane_high_res
    if channels < 2:
        raise ValueError(f"the sphere needs triplane_dim >= 2, got {channels}")
    planes = torch.randn(1, 3, channels, size, size, generator=generator) * 0.01
    for layer in model.decoder.layers:
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
        layer.bias.zero_()
    write_radius_squared(planes, model.decoder, radius, STEEPNESS, model.config.box_size)
    return planes.to(model.decoder.layers[0].weight.device)


@torch.no_grad()
def write_radius_squared(planes: torch.Tensor, decoder, radius: float, steepness: float,
                         box_size: float = 2.0) -> None:
    """In place: x^2 and y^2 into channels 0 and 1 of the XY plane and z^2 into channel 1 of the XZ plane of
    `planes` (1, 3, C, S, S); the decoder's first unit sums them to r^2, its hidden layers pass it on, and
    its raw density is 1 + log(e - 1) + steepness (radius^2 - r^2), activated density 1 at `radius`. The
    other weights and channels are left as they are (small noise)."""
    channels, size = planes.shape[2], planes.shape[-1]
    half = box_size / 2
    # texel centres in box coordinates (grid_sample, align_corners=False)
    ramp = ((torch.arange(size) + 0.5) / size * 2 - 1) * half
    across, down = ramp.view(1, size).expand(size, size), ramp.view(size, 1).expand(size, size)
    planes[0, 0, 0], planes[0, 0, 1], planes[0, 1, 1] = across**2, down**2, down**2
    first, *middle, last = decoder.layers
    first.weight[0].zero_()
    first.weight[0, [0, 1, channels + 1]] = 1  # r^2
    for layer in middle:
        layer.weight[0].zero_()
        layer.weight[0, 0] = 1
    last.weight[0].zero_()
    last.weight[0, 0] = -steepness
    # density_activation(raw) = softplus(raw - 1) is 1 where raw = 1 + log(e - 1)
    last.bias[0] = 1 + steepness * radius**2 + math.log(math.e - 1)
