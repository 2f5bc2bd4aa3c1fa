"""Volume compositing of samples along rays in one Triton kernel, and one for its backward pass.

`VolumeRenderer.composite` in torch runs some 25 elementwise kernels, a cumulative product and their backward
passes over every sample (8.4M an item in training); here a program loads a block of rays as (rays, samples)
tiles and composites them in registers. The arithmetic is the torch one: interval midpoints, softplus(raw - 1)
densities, alpha = 1 - exp(-sigma * delta), transmittance the product of (1 - alpha + 1e-10) over earlier
intervals, taken as a cumulative product of the intervals shifted by one (no division by 1 - alpha, which is 0
behind opaque samples).

The backward pass needs R_i = sum over later intervals k of G_k alpha_k times the product of (1 - alpha_j +
1e-10) between them, where G_k is the gradient of the loss with respect to weight k; then dL/dalpha_i =
T_i (G_i - R_i). R is a reverse scan of affine maps, R_i = G_{i+1} alpha_{i+1} + (1 - alpha_{i+1} + 1e-10)
R_{i+1}, again without dividing by 1 - alpha. It reads the transmittance the forward pass saved (4 bytes a
sample).

Runs on CUDA, and on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use.
"""

from __future__ import annotations

import torch

from vfusion3d_lightning.models.lrm.fused_field import INTERPRETED, triton

if triton is not None:
    import triton.language as tl

RAYS_PER_PROGRAM = 8  # rays a program, each a row of a (rays, samples) tile
NUM_WARPS = 4


def fused_composite_supported(device: torch.device) -> bool:
    """Whether the compositing kernels run here: Triton on a CUDA device, or its interpreter on the CPU."""
    return triton is not None and (device.type == "cuda" or (INTERPRETED and device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _samples(rgb, raw, depths, rays, cols, offset, valid, S: tl.constexpr):
        """Samples `cols + offset` of a block of rays as (rays, columns) tiles: colour channels, raw density,
        depth; zeros outside the ray."""
        inside = valid[:, None] & (cols[None, :] + offset >= 0) & (cols[None, :] + offset < S)
        index = rays[:, None] * S + cols[None, :] + offset
        r = tl.load(rgb + index * 3 + 0, mask=inside, other=0.0)
        g = tl.load(rgb + index * 3 + 1, mask=inside, other=0.0)
        b = tl.load(rgb + index * 3 + 2, mask=inside, other=0.0)
        sigma = tl.load(raw + index, mask=inside, other=0.0)
        depth = tl.load(depths + index, mask=inside, other=0.0)
        return r, g, b, sigma, depth

    @triton.jit
    def _softplus_shifted(x):
        """softplus(x - 1) as torch computes it (linear above 20)."""
        y = x - 1.0
        return tl.where(y > 20.0, y, tl.log(1.0 + tl.exp(tl.minimum(y, 20.0))))

    @triton.jit
    def _intervals(rgb, raw, depths, rays, cols, offset, valid, S: tl.constexpr):
        """Intervals `cols + offset` (between samples i and i+1): midpoint colour, depth and raw density,
        length, density and alpha; alpha 0 outside the ray."""
        r0, g0, b0, s0, d0 = _samples(rgb, raw, depths, rays, cols, offset, valid, S)
        r1, g1, b1, s1, d1 = _samples(rgb, raw, depths, rays, cols, offset + 1, valid, S)
        exists = valid[:, None] & (cols[None, :] + offset >= 0) & (cols[None, :] + offset < S - 1)
        mid = (s0 + s1) / 2
        delta = d1 - d0
        survive = tl.exp(-_softplus_shifted(mid) * delta)
        alpha = tl.where(exists, 1.0 - survive, 0.0)
        return (r0 + r1) / 2, (g0 + g1) / 2, (b0 + b1) / 2, (d0 + d1) / 2, mid, delta, survive, alpha, exists

    @triton.jit
    def _compose(a_right, b_right, a_left, b_left):
        """x -> a_left (a_right x + b_right) + b_left: an interval's step of the backward recurrence (left) after
        those of the intervals behind it (right), which Triton's reverse scan passes first."""
        return a_left * a_right, a_left * b_right + b_left

    @triton.jit
    def _composite_kernel(rgb, raw, depths, weights, transmittance, color, opacity, depth_sum, ray_count,
                          S: tl.constexpr, COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
        rays = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = rays < ray_count
        cols = tl.arange(0, COLUMNS)
        r, g, b, depth_mid, _, _, _, alpha, exists = _intervals(rgb, raw, depths, rays, cols, 0, valid, S)
        # transmittance: the product of (1 - alpha + eps) over earlier intervals, as an inclusive product of
        # the intervals shifted by one (no division by 1 - alpha, which is 0 behind opaque samples)
        _, _, _, _, _, _, _, alpha_before, before = _intervals(rgb, raw, depths, rays, cols, -1, valid, S)
        trans = tl.cumprod(tl.where(before, 1.0 - alpha_before + 1e-10, 1.0), axis=1)
        weight = alpha * trans
        out = rays[:, None] * (S - 1) + cols[None, :]
        tl.store(weights + out, weight, mask=exists)
        tl.store(transmittance + out, trans, mask=exists)
        tl.store(color + rays * 3 + 0, tl.sum(weight * r, axis=1), mask=valid)
        tl.store(color + rays * 3 + 1, tl.sum(weight * g, axis=1), mask=valid)
        tl.store(color + rays * 3 + 2, tl.sum(weight * b, axis=1), mask=valid)
        tl.store(opacity + rays, tl.sum(weight, axis=1), mask=valid)
        tl.store(depth_sum + rays, tl.sum(weight * depth_mid, axis=1), mask=valid)

    @triton.jit
    def _weight_gradient(rgb, raw, depths, grad_weights, rays, cols, offset, valid, gc_r, gc_g, gc_b, g_opacity,
                         g_depth, S: tl.constexpr):
        """G = dL/dweight of intervals `cols + offset`, with their alpha and the intervals' other values."""
        r, g, b, depth_mid, mid, delta, survive, alpha, exists = _intervals(rgb, raw, depths, rays, cols, offset,
                                                                            valid, S)
        upstream = tl.load(grad_weights + rays[:, None] * (S - 1) + cols[None, :] + offset, mask=exists, other=0.0)
        grad = (gc_r[:, None] * r + gc_g[:, None] * g + gc_b[:, None] * b + g_opacity[:, None]
                + g_depth[:, None] * depth_mid + upstream)
        return tl.where(exists, grad, 0.0), alpha, mid, delta, survive, exists

    @triton.jit
    def _composite_backward_kernel(rgb, raw, depths, transmittance, grad_color, grad_opacity, grad_depth_sum,
                                   grad_weights, grad_rgb, grad_raw, ray_count,
                                   S: tl.constexpr, COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
        rays = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = rays < ray_count
        cols = tl.arange(0, COLUMNS)
        gc_r = tl.load(grad_color + rays * 3 + 0, mask=valid, other=0.0)
        gc_g = tl.load(grad_color + rays * 3 + 1, mask=valid, other=0.0)
        gc_b = tl.load(grad_color + rays * 3 + 2, mask=valid, other=0.0)
        g_opacity = tl.load(grad_opacity + rays, mask=valid, other=0.0)
        g_depth = tl.load(grad_depth_sum + rays, mask=valid, other=0.0)
        grad_w, alpha, mid, delta, survive, exists = _weight_gradient(
            rgb, raw, depths, grad_weights, rays, cols, 0, valid, gc_r, gc_g, gc_b, g_opacity, g_depth, S)
        grad_next, alpha_next, _, _, _, _ = _weight_gradient(
            rgb, raw, depths, grad_weights, rays, cols, 1, valid, gc_r, gc_g, gc_b, g_opacity, g_depth, S)
        # R_i = G_{i+1} alpha_{i+1} + (1 - alpha_{i+1} + eps) R_{i+1}: a reverse scan of affine maps
        step_a = tl.where(alpha_next > 0, 1.0 - alpha_next + 1e-10, 1.0)
        _, later = tl.associative_scan((step_a, grad_next * alpha_next), 1, _compose, reverse=True)
        trans = tl.load(transmittance + rays[:, None] * (S - 1) + cols[None, :], mask=exists, other=0.0)
        grad_alpha = trans * (grad_w - later)
        weight = alpha * trans
        # d alpha / d mid = exp(-sigma delta) delta sigmoid(mid - 1); each interval gives half to each end sample
        half_s = tl.where(exists, grad_alpha * survive * delta * tl.sigmoid(mid - 1.0) * 0.5, 0.0)
        half_r = gc_r[:, None] * weight * 0.5
        half_g = gc_g[:, None] * weight * 0.5
        half_b = gc_b[:, None] * weight * 0.5
        # sample j gets interval j's half, then (after the barrier) interval j-1's
        index = rays[:, None] * S + cols[None, :]
        first = valid[:, None] & (cols[None, :] < S)
        tl.store(grad_raw + index, half_s, mask=first)
        tl.store(grad_rgb + index * 3 + 0, half_r, mask=first)
        tl.store(grad_rgb + index * 3 + 1, half_g, mask=first)
        tl.store(grad_rgb + index * 3 + 2, half_b, mask=first)
        tl.debug_barrier()
        second = exists  # interval j adds into sample j+1
        tl.store(grad_raw + index + 1, tl.load(grad_raw + index + 1, mask=second, other=0.0) + half_s, mask=second)
        tl.store(grad_rgb + (index + 1) * 3 + 0, tl.load(grad_rgb + (index + 1) * 3 + 0, mask=second, other=0.0)
                 + half_r, mask=second)
        tl.store(grad_rgb + (index + 1) * 3 + 1, tl.load(grad_rgb + (index + 1) * 3 + 1, mask=second, other=0.0)
                 + half_g, mask=second)
        tl.store(grad_rgb + (index + 1) * 3 + 2, tl.load(grad_rgb + (index + 1) * 3 + 2, mask=second, other=0.0)
                 + half_b, mask=second)


def _columns(samples: int) -> int:
    """Tile width: the samples a ray, to a power of two (Triton's tiles)."""
    return max(16, triton.next_power_of_2(samples))


def _grid(rays: int) -> tuple[int]:
    return (triton.cdiv(rays, RAYS_PER_PROGRAM),)


def _launch_forward(rgb, raw_sigma, depths):
    """Flat rays: rgb (R, S, 3), raw densities and depths (R, S) -> colour, opacity, depth sum, weights and
    transmittance."""
    rays, samples = depths.shape[:2]
    weights = torch.empty(rays, samples - 1, device=rgb.device)
    transmittance = torch.empty_like(weights)
    color = torch.empty(rays, 3, device=rgb.device)
    opacity = torch.empty(rays, device=rgb.device)
    depth_sum = torch.empty(rays, device=rgb.device)
    if rays:
        _composite_kernel[_grid(rays)](rgb, raw_sigma, depths, weights, transmittance, color, opacity, depth_sum,
                                       rays, S=samples, COLUMNS=_columns(samples), BLOCK=RAYS_PER_PROGRAM,
                                       num_warps=NUM_WARPS)
    return color, opacity, depth_sum, weights, transmittance


class _FusedComposite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rgb, raw_sigma, depths):
        color, opacity, depth_sum, weights, transmittance = _launch_forward(rgb, raw_sigma, depths)
        ctx.save_for_backward(rgb, raw_sigma, depths, transmittance)
        return color, opacity, depth_sum, weights

    @staticmethod
    def backward(ctx, grad_color, grad_opacity, grad_depth_sum, grad_weights):
        rgb, raw_sigma, depths, transmittance = ctx.saved_tensors
        rays, samples = depths.shape[:2]

        def dense(grad, shape):  # autograd passes None for outputs the loss does not use
            return torch.zeros(shape, device=rgb.device) if grad is None else grad.float().contiguous()

        grad_rgb = torch.empty_like(rgb)
        grad_raw = torch.empty_like(raw_sigma)
        if rays:
            _composite_backward_kernel[_grid(rays)](
                rgb, raw_sigma, depths, transmittance, dense(grad_color, (rays, 3)), dense(grad_opacity, (rays,)),
                dense(grad_depth_sum, (rays,)), dense(grad_weights, (rays, samples - 1)), grad_rgb, grad_raw, rays,
                S=samples, COLUMNS=_columns(samples), BLOCK=RAYS_PER_PROGRAM, num_warps=NUM_WARPS)
        return grad_rgb, grad_raw, None


def composite_fused(rgb: torch.Tensor, raw_sigma: torch.Tensor, depths: torch.Tensor):
    """rgb (..., S, 3), raw densities and depths (..., S, 1) -> colour without background (..., 3), opacity
    (..., 1), weighted depth sum (..., 1), interval weights (..., S-1, 1), fp32. Differentiable in rgb and the
    raw densities (not the depths)."""
    lead, samples = depths.shape[:-2], depths.shape[-2]
    if samples < 2:
        raise ValueError(f"compositing needs at least 2 samples a ray, got {samples}")
    rgb, raw_sigma, depths = (t.float().reshape(-1, samples, t.shape[-1]).contiguous()
                              for t in (rgb, raw_sigma, depths.detach()))
    raw_sigma, depths = raw_sigma.squeeze(-1), depths.squeeze(-1)
    if torch.is_grad_enabled() and (rgb.requires_grad or raw_sigma.requires_grad):
        color, opacity, depth_sum, weights = _FusedComposite.apply(rgb, raw_sigma, depths)
    else:  # a plain launch, which torch.compile takes into a compiled renderer (inference)
        color, opacity, depth_sum, weights, _ = _launch_forward(rgb, raw_sigma, depths)
    return (color.reshape(*lead, 3), opacity.reshape(*lead, 1), depth_sum.reshape(*lead, 1),
            weights.reshape(*lead, samples - 1, 1))
