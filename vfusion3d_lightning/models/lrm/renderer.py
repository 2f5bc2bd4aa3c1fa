"""Triplane sampling, the NeRF decoder, camera rays and importance volume rendering.

Numbers follow the released VFusion3D renderer (EG3D/OpenLRM lineage): planes XY, XZ, ZY; bilinear
sampling with zero padding; rays clipped to the box; stratified + importance samples; MipNeRF-style
compositing on interval midpoints with softplus(sigma - 1) density; white background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vfusion3d_lightning.cameras import split_render_camera
from vfusion3d_lightning.models.lrm.fused_composite import composite_fused, fused_composite_supported
from vfusion3d_lightning.models.lrm.fused_field import FusedField, fused_field_supported

# Channels of each plane's 2D coordinates: plane 0 is XY, plane 1 XZ, plane 2 ZY (EG3D issue 67 fix).
PLANE_AXES = ((0, 1), (0, 2), (2, 1))


def plane_coordinates(points: torch.Tensor, box_size: float) -> torch.Tensor:
    """points (B, M, 3) in the box -> each plane's grid_sample coordinates in [-1, 1]: (B, 3, M, 2)."""
    coords = points * (2.0 / box_size)
    return torch.stack([coords[..., list(axes)] for axes in PLANE_AXES], dim=1)


def sample_triplane(planes: torch.Tensor, points: torch.Tensor, box_size: float = 2.0) -> torch.Tensor:
    """Bilinear features of `points` from each plane, concatenated plane by plane.

    planes: (B, 3, C, H, W); points: (B, M, 3) in [-box/2, box/2]^3 -> (B, M, 3*C).
    """
    batch, n_planes, channels, height, width = planes.shape
    if n_planes != 3:
        raise ValueError(f"planes must be (B, 3, C, H, W), got shape {tuple(planes.shape)}")
    grid = plane_coordinates(points, box_size).reshape(batch * 3, 1, -1, 2).to(planes.dtype)
    features = F.grid_sample(planes.reshape(batch * 3, channels, height, width), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=False)  # (B*3, C, 1, M)
    features = features.reshape(batch, 3, channels, -1)
    return features.permute(0, 3, 1, 2).reshape(batch, -1, 3 * channels)


# Training: samples are split into this many groups, each sampling its own copy of the planes. The gradient of
# grid_sample adds every sample's share into the plane texels with atomics; millions of samples on a 64x64
# plane collide on the same addresses, and that backward took 44% of an H100 training step. Copies divide
# the collisions; their gradients are summed afterwards. Only on a GPU: a CPU's backward has no atomics, and the
# copies cost it time (benchmarks/quickstart_cpu.py, fused AdamW: 0.100 s a quickstart step with 32, 0.094 s with one).
GRADIENT_GROUPS = 32


def sample_projected(projected: torch.Tensor, points: torch.Tensor, box_size: float = 2.0) -> torch.Tensor:
    """The sum over the three planes of bilinear features at `points`, channels first.

    projected: (B, 3, D, H, W) (planes after `TriplaneDecoder.project`); points: (B, M, 3) -> (B, G, D, M/G):
    samples in G groups of consecutive points (G = GRADIENT_GROUPS when gradients reach planes on a GPU, else 1;
    the points are padded to a multiple of G with points outside the box, whose features are 0).
    """
    batch, _, channels, height, width = projected.shape
    groups = GRADIENT_GROUPS if projected.is_cuda and torch.is_grad_enabled() and projected.requires_grad else 1
    count = points.shape[1]
    padded = -(-count // groups) * groups
    if padded != count:
        points = F.pad(points, (0, 0, 0, padded - count), value=2.0 * box_size)
    # float32 sampling: bf16 coordinates would land up to 1/8 texel off, and bf16 grid_sample is slower
    grid = plane_coordinates(points, box_size).reshape(batch * 3 * groups, 1, -1, 2).float()
    planes = projected.float().reshape(batch * 3, 1, channels, height, width).expand(-1, groups, -1, -1, -1)
    features = F.grid_sample(planes.reshape(-1, channels, height, width), grid, mode="bilinear",
                             padding_mode="zeros", align_corners=False)  # (B*3*G, D, 1, M/G)
    return features.reshape(batch, 3, groups, channels, -1).sum(dim=1)


class TriplaneDecoder(nn.Module):
    """MLP on triplane features -> raw density (B, M, 1) and colour in [-0.001, 1.001] (B, M, 3).

    `forward` takes the concatenated features of the three planes, as released. The renderer uses the
    same network in an equal, cheaper form: the first layer is linear and bilinear sampling is linear, so
    projecting each plane by its block of the first layer's weights once (`project`, 80 -> 64 channels per
    plane for the released sizes) and summing the three samples (`sample_projected`) gives the first
    layer's output without its per-sample matrix product (two thirds of the decoder's FLOPs) or the
    channels-last copy of 240 features a sample; `decode_projected` runs the rest channels first.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 64, num_layers: int = 4):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [4]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))
        for layer in self.layers:
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = self.layers[-1](x)
        return _outputs(x)

    def project(self, planes: torch.Tensor) -> torch.Tensor:
        """planes (B, 3, C, H, W) -> each plane through its block of the first layer: (B, 3, D, H, W)."""
        first = self.layers[0]
        blocks = first.weight.reshape(first.out_features, 3, -1).transpose(0, 1)  # (3, D, C)
        return torch.einsum("pdc,bpchw->bpdhw", blocks.to(planes.dtype), planes)

    def decode_projected(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's output before its bias, (B, G, D, M/G) from `sample_projected` -> as `forward`,
        (B, G * M/G, 1) and (B, G * M/G, 3)."""
        batch, groups, channels, count = hidden.shape
        first, last = self.layers[0], self.layers[-1]
        x = F.relu(hidden.reshape(batch * groups, channels, count) + first.bias.to(hidden.dtype)[:, None])
        # bmm on channels-first blocks; torch.matmul of a matrix by a batch would copy the batch transposed
        for layer in self.layers[1:-1]:
            weight = layer.weight.to(x.dtype).expand(len(x), -1, -1)
            x = F.relu(torch.bmm(weight, x) + layer.bias.to(x.dtype)[:, None])
        x = torch.bmm(last.weight.to(x.dtype).expand(len(x), -1, -1), x) + last.bias.to(x.dtype)[:, None]
        return _outputs(x.reshape(batch, groups, 4, count).transpose(-1, -2).reshape(batch, groups * count, 4))


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # MipNeRF's widened sigmoid lets colours reach exactly 0 and 1
    return x[..., :1], torch.sigmoid(x[..., 1:]) * 1.002 - 0.001


OPACITY_FOR_DEPTH = 1e-10  # below this a ray's depth is the farthest sample's; its square is a normal fp32


def density_activation(raw_sigma: torch.Tensor) -> torch.Tensor:
    # the -1 bias makes a freshly initialised field nearly empty
    return F.softplus(raw_sigma - 1.0)


def batch_items(batch: int, count: int, device: torch.device) -> torch.Tensor:
    """The batch index of each of `count` points a batch item, flattened: (batch * count,)."""
    return torch.arange(batch, device=device).repeat_interleave(count)


@dataclass
class Field:
    """A triplane field ready to query: points (B, M, 3) -> raw density (B, M, 1), colour (B, M, 3)."""

    planes: torch.Tensor  # (B, 3, D, H, W) projected, or (B, 3, C, H, W) as they are
    decoder: TriplaneDecoder
    projected: bool
    box_size: float
    fused: FusedField | None = None  # the one-kernel query (fused_field.py), when the renderer chose it

    def __call__(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None:
            batch, count = points.shape[:2]
            raw_sigma, rgb = self.fused(points.reshape(-1, 3), batch_items(batch, count, points.device))
            return raw_sigma.reshape(batch, count, 1), rgb.reshape(batch, count, 3)
        if self.projected:
            count = points.shape[1]
            raw_sigma, rgb = self.decoder.decode_projected(sample_projected(self.planes, points, self.box_size))
            return raw_sigma[:, :count], rgb[:, :count]  # without the padding of the sample groups
        return self.decoder(sample_triplane(self.planes, points, self.box_size))

    def at(self, points: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat query: points (N, 3) of batch items `item` (N,) -> raw density (N, 1), colour (N, 3)."""
        if self.fused is not None:
            return self.fused(points, item)
        parts = [self(points[item == b][None]) for b in range(self.planes.shape[0])]
        raw_sigma = torch.empty(len(points), 1, device=points.device, dtype=parts[0][0].dtype)
        rgb = torch.empty(len(points), 3, device=points.device, dtype=parts[0][1].dtype)
        for b, (part_sigma, part_rgb) in enumerate(parts):
            raw_sigma[item == b], rgb[item == b] = part_sigma[0], part_rgb[0]
        return raw_sigma, rgb


@dataclass
class Occupancy:
    """Cells of a R^3 grid over the box where the field may hold density; samples elsewhere are skipped.

    cells: (B, R, R, R) bool indexed [x, y, z], from `VolumeRenderer.occupancy`."""

    cells: torch.Tensor
    box_size: float

    @property
    def fraction(self) -> float:
        """The share of cells occupied."""
        return self.cells.float().mean().item()

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """points (B, M, 3) -> (B, M) bool: in an occupied cell (points outside the box are not)."""
        batch, count = points.shape[:2]
        return self.at(points.reshape(-1, 3), batch_items(batch, count, points.device)).reshape(batch, count)

    def at(self, points: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Flat form: points (N, 3) of batch items `item` (N,) -> (N,) bool."""
        resolution, half = self.cells.shape[-1], self.box_size / 2
        inside = ((points >= -half) & (points <= half)).all(dim=-1)
        index = ((points + half) * (resolution / self.box_size)).long().clamp(0, resolution - 1)
        return inside & self.cells[item, index[:, 0], index[:, 1], index[:, 2]]


@dataclass
class RenderOutput:
    """Rendered views. rgb (B, V, 3, h, w); depth (B, V, 1, h, w); opacity (B, V, 1, h, w)."""

    rgb: torch.Tensor
    depth: torch.Tensor
    opacity: torch.Tensor


def camera_rays(
    cameras: torch.Tensor, size: int, patch: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through pixel centres of a size x size image, or of a patch of it.

    cameras: (..., 25) render cameras; patch: (x0, y0, patch_size) in pixels of the full image.
    -> origins, directions: (..., h*w, 3), pixels in row-major order.
    """
    if size <= 0:
        raise ValueError(f"render size must be positive, got {size}")
    x0, y0, extent = (0, 0, size) if patch is None else patch
    if extent <= 0 or x0 < 0 or y0 < 0 or x0 + extent > size or y0 + extent > size:
        raise ValueError(f"patch (x0={x0}, y0={y0}, size={extent}) does not fit in a {size}x{size} render")
    # checked where it costs nothing; on a GPU the check would stall every training step on the host
    if cameras.device.type == "cpu" and not bool(torch.isfinite(cameras).all()):
        raise ValueError("render cameras hold NaN or inf values")
    pose, k = split_render_camera(cameras.float())
    device = cameras.device
    cols = (torch.arange(extent, device=device, dtype=torch.float32) + x0 + 0.5) / size
    rows = (torch.arange(extent, device=device, dtype=torch.float32) + y0 + 0.5) / size
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    u, v = u.reshape(-1), v.reshape(-1)  # (P,)
    fx, fy, cx, cy, skew = (k[..., 0, 0, None], k[..., 1, 1, None], k[..., 0, 2, None], k[..., 1, 2, None],
                            k[..., 0, 1, None])
    # lift in OpenCV camera coordinates (z forward, y down) ...
    y_cam = (v - cy) / fy
    x_cam = (u - cx - skew * y_cam) / fx
    # ... then flip y and z into the OpenGL camera the poses are written in
    local = torch.stack([x_cam, -y_cam, -torch.ones_like(x_cam)], dim=-1)  # (..., P, 3)
    directions = F.normalize(local @ pose[..., :3, :3].transpose(-1, -2), dim=-1)
    origins = pose[..., None, :3, 3].expand_as(directions)
    return origins, directions


def ray_box_limits(origins: torch.Tensor, directions: torch.Tensor, half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the box [-half, half]^3: (..., 1) each.

    Rays that miss get the smallest entry and the largest entry distance of the rays that hit (as
    released), so their samples lie in empty space and render as background. When no ray hits, all
    limits are 0. Unlike the released code, a box behind the camera is a miss and a camera inside the
    box starts sampling at itself: both cases rendered what lies behind the camera there; for cameras
    outside the box facing it (every camera the model is used with) the limits are the same.
    """
    inv = 1.0 / directions
    t0 = (-half - origins) * inv
    t1 = (half - origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=-1, keepdim=True).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1, keepdim=True)
    hit = t_far > t_near
    # Python scalars, not a tensor made on the host: copying one to the GPU would wait for the GPU's queue
    lowest = torch.where(hit, t_near, float("inf")).amin()
    highest = torch.where(hit, t_near, float("-inf")).amax()
    any_hit = hit.any()
    t_near = torch.where(hit, t_near, torch.where(any_hit, lowest, 0.0))
    t_far = torch.where(hit, t_far, torch.where(any_hit, highest, 0.0))
    return t_near, t_far


def _merge_samples(coarse, fine):
    """(depths, rgb, raw sigma) of two sample sets along the same rays, (..., S, 1|3) each -> one set sorted
    by depth."""
    depths, order = torch.sort(torch.cat([coarse[0], fine[0]], dim=-2), dim=-2)
    rgb = torch.cat([coarse[1], fine[1]], dim=-2).gather(-2, order.expand(*order.shape[:-1], 3))
    sigma = torch.cat([coarse[2], fine[2]], dim=-2).gather(-2, order)
    return depths, rgb, sigma


class VolumeRenderer(nn.Module):
    """Importance volume rendering of a triplane field along rays (no parameters)."""

    def __init__(self, coarse_samples: int = 64, importance_samples: int = 64, box_size: float = 2.0,
                 white_background: bool = True, project_planes: bool = True, fused: bool = True):
        super().__init__()
        self.coarse_samples = coarse_samples
        self.importance_samples = importance_samples
        self.box_size = box_size
        self.white_background = white_background
        # False: the released computation (concatenated features through the whole MLP), for comparisons
        self.project_planes = project_planes
        # False: without gradients, never the one-kernel query of fused_field.py (it needs projected planes)
        # nor the compositing kernel of fused_composite.py
        self.fused = fused
        # recompute each pass of rays in the backward: a pass's samples, not the whole batch's, stay in memory
        self.gradient_checkpointing = False
        # the one-kernel query and compositing under autograd too: the query's backward recomputes each block
        # and adds gradients by atomics (5x the unfused query and backward in bf16 on an H100, BENCHMARKS.md)
        self.fused_training = True

    def field(self, planes: torch.Tensor, decoder: TriplaneDecoder) -> "Field":
        """What the renderer queries: planes, projected once per call when `project_planes`; on a GPU, through
        the one-kernel query (bf16 under autocast, else fp32), under autograd when `fused_training`."""
        if not self.project_planes:
            return Field(planes, decoder, False, self.box_size)
        projected = decoder.project(planes)
        fused = None
        needs_gradient = torch.is_grad_enabled() and (planes.requires_grad or decoder.layers[0].weight.requires_grad)
        wanted = self.fused_training if needs_gradient else self.fused
        if wanted and fused_field_supported(planes.device, decoder.layers[0].out_features):
            bf16 = torch.is_autocast_enabled(planes.device.type)
            fused = FusedField(projected, decoder, self.box_size, bf16)
        return Field(projected, decoder, True, self.box_size, fused)

    @torch.no_grad()
    def occupancy(self, planes: torch.Tensor, decoder: TriplaneDecoder, resolution: int = 128,
                  threshold: float | None = None) -> Occupancy:
        """Cells of a `resolution`^3 grid over the box whose corners reach activated density `threshold`,
        grown by one cell each way so that density between the corners is not missed.

        The default threshold, 0.5 / 255 over the box's diagonal, bounds what skipping removes: a ray that
        crosses the whole box through density below it loses under half a grey level of opacity.
        """
        if resolution < 1:
            raise ValueError(f"occupancy resolution must be positive, got {resolution}")
        if threshold is None:
            threshold = 0.5 / 255 / (self.box_size * 3**0.5)
        field = self.field(planes, decoder)
        half = self.box_size / 2
        axis = torch.linspace(-half, half, resolution + 1, device=planes.device)
        nodes = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3)
        batch = planes.shape[0]
        raw_sigma, _ = field(nodes.expand(batch, -1, -1))
        dense = (density_activation(raw_sigma.float()) > threshold).reshape(batch, 1, *(resolution + 1,) * 3)
        # a cell is occupied when any of its 8 corners is, then one more cell each way
        cells = F.max_pool3d(dense.float(), 2, 1)
        cells = F.max_pool3d(cells, 3, 1, padding=1)[:, 0] > 0
        return Occupancy(cells, self.box_size)

    def query(self, planes: torch.Tensor, decoder: TriplaneDecoder, points: torch.Tensor):
        """Raw density (B, M, 1) and colour (B, M, 3) at points (B, M, 3)."""
        return self.field(planes, decoder)(points)

    def _shade(self, field, origins, directions, depths):
        """Colours and raw densities of samples at `depths` (B, R, S, 1) -> (B, R, S, 3), (B, R, S, 1)."""
        points = origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)  # (B, R, S, 3)
        batch, rays, samples, _ = points.shape
        raw_sigma, rgb = field(points.reshape(batch, -1, 3))
        half = self.box_size / 2
        inside = ((points >= -half) & (points <= half)).all(dim=-1, keepdim=True).reshape(batch, -1, 1)
        # outside the box: no colour and a density that softplus maps to 0
        empty = torch.finfo(raw_sigma.dtype).min / 3
        rgb = torch.where(inside, rgb, torch.zeros((), dtype=rgb.dtype, device=rgb.device))
        raw_sigma = torch.where(inside, raw_sigma, torch.full((), empty, dtype=raw_sigma.dtype, device=rgb.device))
        return rgb.reshape(batch, rays, samples, 3), raw_sigma.reshape(batch, rays, samples, 1)

    def composite(self, rgb: torch.Tensor, raw_sigma: torch.Tensor, depths: torch.Tensor):
        """Volume rendering on interval midpoints. Inputs (B, R, S, C) -> rgb (B, R, 3), depth (B, R, 1),
        opacity (B, R, 1), per-interval weights (B, R, S-1, 1). On a GPU one Triton kernel (fused_composite.py)
        under the same switches as the field query (`fused`, `fused_training`)."""
        wanted = self.fused_training if torch.is_grad_enabled() else self.fused
        if wanted and not depths.requires_grad and fused_composite_supported(rgb.device):
            color, opacity, depth_sum, weights = composite_fused(rgb, raw_sigma, depths)
        else:
            deltas = depths[..., 1:, :] - depths[..., :-1, :]
            rgb_mid = (rgb[..., 1:, :] + rgb[..., :-1, :]) / 2
            sigma_mid = density_activation((raw_sigma[..., 1:, :] + raw_sigma[..., :-1, :]) / 2)
            depth_mid = (depths[..., 1:, :] + depths[..., :-1, :]) / 2
            alpha = 1 - torch.exp(-sigma_mid * deltas)
            transmittance = torch.cumprod(
                torch.cat([torch.ones_like(alpha[..., :1, :]), 1 - alpha + 1e-10], dim=-2), dim=-2
            )[..., :-1, :]
            weights = alpha * transmittance
            color = (weights * rgb_mid).sum(dim=-2)
            opacity = weights.sum(dim=-2)
            depth_sum = (weights * depth_mid).sum(dim=-2)
        # a ray of (nearly) no opacity has no surface: the farthest depth after the clamp, as released; chosen
        # by a threshold, not by 0 / 0 -> NaN, whose backward gave NaN gradients even where the clamp stops them
        visible = opacity > OPACITY_FOR_DEPTH
        depth = torch.where(visible, depth_sum / opacity.clamp_min(OPACITY_FOR_DEPTH), float("inf"))
        depth = torch.clamp(depth, depths.min(), depths.max())
        if self.white_background:
            color = color + 1 - opacity
        return color, depth, opacity, weights

    def _stratified(self, t_near, t_far, generator):
        """(B, R, 1) limits -> (B, R, S, 1) jittered evenly spaced depths."""
        n = self.coarse_samples
        steps = torch.arange(n, device=t_near.device, dtype=t_near.dtype) / (n - 1)
        span = t_far - t_near
        depths = t_near + steps * span  # (B, R, S)
        jitter = torch.rand(depths.shape, generator=generator, device=depths.device, dtype=depths.dtype)
        return (depths + jitter * span / (n - 1)).unsqueeze(-1)

    def _uniforms(self, rays: int, device: torch.device, generator) -> torch.Tensor:
        """The importance sampler's random numbers for `rays` rays: (rays, N) float32."""
        return torch.rand(rays, self.importance_samples, generator=generator, device=device)

    def _importance(self, depths, weights, generator, u=None):
        """Inverse-CDF samples from smoothed coarse weights: (B, R, S, 1), (B, R, S-1, 1) -> (B, R, N, 1).
        u: the sampler's uniforms (B*R, N), drawn from `generator` when None."""
        with torch.no_grad():
            lead = depths.shape[:-2]
            z = depths.reshape(-1, depths.shape[-2])
            w = weights.reshape(-1, 1, weights.shape[-2]).float()
            w = F.avg_pool1d(F.max_pool1d(w, 2, 1, padding=1), 2, 1).squeeze(1) + 0.01
            z_mid = 0.5 * (z[:, :-1] + z[:, 1:])
            w = w[:, 1:-1] + 1e-5
            # the released sampler uses S-3 weights, so the last midpoint is never a bin edge
            bins = z_mid[:, : w.shape[1] + 1]
            cdf = torch.cumsum(w / w.sum(-1, keepdim=True), dim=-1)
            cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], dim=-1)
            u = self._uniforms(z.shape[0], z.device, generator) if u is None else u
            idx = torch.searchsorted(cdf, u, right=True)
            below = (idx - 1).clamp_min(0)
            above = idx.clamp_max(w.shape[1])
            cdf_lo, cdf_hi = cdf.gather(1, below), cdf.gather(1, above)
            bin_lo, bin_hi = bins.gather(1, below), bins.gather(1, above)
            denom = cdf_hi - cdf_lo
            denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
            samples = bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)
            return samples.to(depths.dtype).reshape(*lead, self.importance_samples, 1)

    def render_rays(self, field, origins, directions, generator=None, occupancy=None):
        """field (from `field`); origins, directions (B, R, 3) -> rgb (B, R, 3), depth (B, R, 1), opacity (B, R, 1).
        occupancy: an `Occupancy` whose empty cells are skipped (`_render_occupied`), or None."""
        t_near, t_far = ray_box_limits(origins, directions, self.box_size / 2)
        depths = self._stratified(t_near, t_far, generator)
        if occupancy is not None:
            return self._render_occupied(field, origins, directions, depths, generator, occupancy)
        rgb, sigma = self._shade(field, origins, directions, depths)
        if self.importance_samples > 0:
            with torch.no_grad():  # the weights only place the fine samples (no gradient, as released)
                _, _, _, weights = self.composite(rgb, sigma, depths)
            fine_depths = self._importance(depths, weights, generator)
            fine_rgb, fine_sigma = self._shade(field, origins, directions, fine_depths)
            depths, rgb, sigma = _merge_samples((depths, rgb, sigma), (fine_depths, fine_rgb, fine_sigma))
        color, depth, opacity, _ = self.composite(rgb, sigma, depths)
        return color, depth, opacity

    def _shade_occupied(self, field, origins, directions, depths, item, occupancy):
        """Flat rays: origins, directions (R, 3), depths (R, S, 1), batch items (R,) -> colours (R, S, 3),
        raw densities (R, S, 1) and which samples were queried (R, S); the others are empty space."""
        rays, samples = depths.shape[:2]
        points = (origins[:, None] + depths * directions[:, None]).reshape(-1, 3)
        item = item.repeat_interleave(samples)
        keep = occupancy.at(points, item)
        where = keep.nonzero().squeeze(1)  # a host sync: only inference skips
        kept_sigma, kept_rgb = field.at(points[where], item[where])
        raw_sigma = torch.full((len(points), 1), torch.finfo(kept_sigma.dtype).min / 3, dtype=kept_sigma.dtype,
                               device=points.device)  # softplus maps it to 0
        rgb = torch.zeros((len(points), 3), dtype=kept_rgb.dtype, device=points.device)
        raw_sigma[where], rgb[where] = kept_sigma, kept_rgb
        return rgb.reshape(rays, samples, 3), raw_sigma.reshape(rays, samples, 1), keep.reshape(rays, samples)

    @torch.no_grad()
    def _render_occupied(self, field, origins, directions, depths, generator, occupancy):
        """`render_rays` querying only samples in occupied cells, and finishing only the rays that have one.

        A ray with no coarse sample in an occupied cell is background: its importance samples would follow
        flat weights through the same empty cells. Random numbers are drawn as in the full render, so frames
        differ from it only where skipped space held density below the occupancy threshold (and in the depth
        of rays that see nothing, which composite clamps over the rays rendered together).
        """
        batch, rays, samples = depths.shape[:3]
        uniforms = self._uniforms(batch * rays, depths.device, generator) if self.importance_samples else None
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
        depths = depths.reshape(-1, samples, 1)
        item = batch_items(batch, rays, depths.device)
        rgb, sigma, kept = self._shade_occupied(field, origins, directions, depths, item, occupancy)
        live = kept.any(dim=1).nonzero().squeeze(1)
        color = torch.full((batch * rays, 3), 1.0 if self.white_background else 0.0, device=depths.device)
        depth = depths.max().expand(batch * rays, 1).clone()
        opacity = torch.zeros(batch * rays, 1, device=depths.device)
        if len(live):
            origins, directions, depths, item = origins[live], directions[live], depths[live], item[live]
            rgb, sigma = rgb[live], sigma[live]
            if self.importance_samples > 0:
                with torch.no_grad():
                    _, _, _, weights = self.composite(rgb, sigma, depths)
                fine_depths = self._importance(depths, weights, None, uniforms[live])
                fine_rgb, fine_sigma, _ = self._shade_occupied(field, origins, directions, fine_depths, item, occupancy)
                depths, rgb, sigma = _merge_samples((depths, rgb, sigma), (fine_depths, fine_rgb, fine_sigma))
            live_color, live_depth, live_opacity, _ = self.composite(rgb, sigma, depths)
            color[live], depth[live], opacity[live] = live_color.float(), live_depth.float(), live_opacity.float()
        return color.reshape(batch, rays, 3), depth.reshape(batch, rays, 1), opacity.reshape(batch, rays, 1)

    def _render_pass(self, field, origins, directions, generator, occupancy):
        """`render_rays`, recomputed in the backward pass under `gradient_checkpointing`."""
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return self.render_rays(field, origins, directions, generator, occupancy)
        # checkpoint replays the global RNG for the recompute, not a caller's generator: replay it here, and
        # leave it where the later passes' forward left it
        state = None if generator is None else generator.get_state()
        runs = []

        def rerun(origins, directions):
            if state is None or not runs:
                runs.append(True)
                return self.render_rays(field, origins, directions, generator, occupancy)
            now = generator.get_state()
            generator.set_state(state)
            try:
                return self.render_rays(field, origins, directions, generator, occupancy)
            finally:  # checkpoint may stop the recompute early, by an exception, once it has what it needs
                generator.set_state(now)

        return checkpoint(rerun, origins, directions, use_reentrant=False)

    def forward(self, planes, decoder, cameras, size, patch=None, generator=None, max_rays=None,
                occupancy=None) -> RenderOutput:
        """planes (B, 3, C, H, W); cameras (B, V, 25) -> RenderOutput with (B, V, *, h, w) images.

        `max_rays` bounds the rays per batch item in one pass (memory); None renders all at once.
        `occupancy` (from `occupancy`) skips the samples in its empty cells.
        """
        if cameras.ndim != 3 or cameras.shape[0] != planes.shape[0]:
            raise ValueError(
                f"render cameras must be (B, V, 25) with B = {planes.shape[0]} planes, got {tuple(cameras.shape)}"
            )
        batch, views = cameras.shape[:2]
        extent = size if patch is None else patch[2]
        origins, directions = camera_rays(cameras, size, patch)  # (B, V, P, 3)
        origins, directions = origins.reshape(batch, -1, 3), directions.reshape(batch, -1, 3)
        step = origins.shape[1] if max_rays is None else max_rays
        field = self.field(planes, decoder)
        outputs = [
            self._render_pass(field, origins[:, i: i + step], directions[:, i: i + step], generator, occupancy)
            for i in range(0, origins.shape[1], step)
        ]
        color, depth, opacity = (torch.cat(parts, dim=1) for parts in zip(*outputs))

        def to_images(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, views, extent, extent, -1).permute(0, 1, 4, 2, 3)

        return RenderOutput(rgb=to_images(color), depth=to_images(depth), opacity=to_images(opacity))
