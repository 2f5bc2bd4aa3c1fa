"""One Triton kernel for a triplane field query without gradients: sampling, plane sum and the decoder MLP.

The unfused path writes each sample's 3 x 64 sampled channels to memory, reads them back to sum the planes,
and writes and reads 64 channels again around every MLP layer: several kilobytes of GPU memory traffic a
sample, which bounds turntables and density grids. Here a block of samples gathers its bilinear corners from
channels-last planes (a corner is one contiguous row of channels, and 64x64 planes stay in the L2 cache),
sums the planes in registers and runs the MLP on tensor cores; only 12 bytes in and 16 bytes out a sample
touch memory.

The arithmetic is the projected form of `TriplaneDecoder` (see `TriplaneDecoder.project`): planes projected by
the first layer are sampled and summed, then bias, ReLU, the hidden layers and the output layer. In bf16 mode
the projected planes, weights and activations entering each matrix product are bf16 with fp32 accumulation (as
under bf16 autocast); in fp32 mode every product is IEEE fp32.

Runs on CUDA, and on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with CUDA builds of torch; without it the unfused path runs
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 32  # samples a program; measured on an H100 (benchmarks/field_query.py)
NUM_WARPS = 4
OUT_WIDTH = 16  # the 4 outputs padded to the smallest matrix width tl.dot takes


def fused_field_supported(device: torch.device, hidden_dim: int) -> bool:
    """Whether `query_fused` runs here: Triton on a CUDA device (or its interpreter on the CPU) and a decoder
    width tl.dot takes (a power of two, at least 16)."""
    if triton is None or hidden_dim < 16 or hidden_dim & (hidden_dim - 1):
        return False
    return device.type == "cuda" or (INTERPRETED and device.type == "cpu")


if triton is not None:
    _INTERPRETED_DOT = tl.constexpr(INTERPRETED)

    @triton.jit
    def _dot(a, b, BF16: tl.constexpr):
        # one return: a return inside a constexpr branch does not end the compiled function
        if BF16:
            if _INTERPRETED_DOT:  # the interpreter's bf16 dot is wrong; the same products in fp32 are exact
                out = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                out = tl.dot(a.to(tl.bfloat16), b)
        else:
            out = tl.dot(a, b, input_precision="ieee")
        return out

    @triton.jit
    def _bilinear(plane, u, v, height, width, cols, valid, D: tl.constexpr):
        """Features (BLOCK, D) at grid coordinates u (width) and v (height) in [-1, 1]: grid_sample with
        align_corners=False and zero padding."""
        x = ((u + 1.0) * width - 1.0) * 0.5
        y = ((v + 1.0) * height - 1.0) * 0.5
        x_floor = tl.floor(x)
        y_floor = tl.floor(y)
        fx = x - x_floor
        fy = y - y_floor
        x0 = x_floor.to(tl.int32)
        y0 = y_floor.to(tl.int32)
        acc = tl.zeros((u.shape[0], D), dtype=tl.float32)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                xi = x0 + dx
                yi = y0 + dy
                weight = (fx * dx + (1.0 - fx) * (1 - dx)) * (fy * dy + (1.0 - fy) * (1 - dy))
                inside = valid & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                offsets = (yi * width + xi).to(tl.int64) * D
                corner = tl.load(plane + offsets[:, None] + cols[None, :], mask=inside[:, None], other=0.0)
                acc += weight[:, None] * corner.to(tl.float32)
        return acc

    @triton.jit
    def _triplane_field_kernel(points, item, planes, first_bias, hidden_weights, hidden_biases, last_weight,
                               last_bias, out, count, height, width, scale,
                               D: tl.constexpr, HIDDEN_LAYERS: tl.constexpr, OUT: tl.constexpr,
                               BLOCK_SIZE: tl.constexpr, BF16: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        valid = rows < count
        # the casts keep fp32 where torch.compile passes the Python float `scale` as fp64
        x = (tl.load(points + rows * 3 + 0, mask=valid, other=0.0) * scale).to(tl.float32)
        y = (tl.load(points + rows * 3 + 1, mask=valid, other=0.0) * scale).to(tl.float32)
        z = (tl.load(points + rows * 3 + 2, mask=valid, other=0.0) * scale).to(tl.float32)
        batch = tl.load(item + rows, mask=valid, other=0).to(tl.int64)
        plane_size = height * width * D
        base = planes + batch[:, None] * (3 * plane_size)
        cols = tl.arange(0, D)
        # planes XY, XZ, ZY (renderer.PLANE_AXES)
        hidden = _bilinear(base, x, y, height, width, cols, valid, D)
        hidden += _bilinear(base + plane_size, x, z, height, width, cols, valid, D)
        hidden += _bilinear(base + 2 * plane_size, z, y, height, width, cols, valid, D)
        hidden = tl.maximum(hidden + tl.load(first_bias + cols)[None, :], 0.0)
        for layer in tl.static_range(HIDDEN_LAYERS):
            weight = tl.load(hidden_weights + layer * D * D + cols[:, None] * D + cols[None, :])  # (in, out)
            bias = tl.load(hidden_biases + layer * D + cols).to(tl.float32)
            hidden = tl.maximum(_dot(hidden, weight, BF16) + bias[None, :], 0.0)
        outs = tl.arange(0, OUT)
        weight = tl.load(last_weight + cols[:, None] * OUT + outs[None, :])
        raw = _dot(hidden, weight, BF16) + tl.load(last_bias + outs).to(tl.float32)[None, :]
        # column 0 is the raw density; 1..3 the colour through MipNeRF's widened sigmoid (renderer._outputs)
        value = tl.where(outs[None, :] == 0, raw, tl.sigmoid(raw) * 1.002 - 0.001)
        tl.store(out + rows[:, None] * 4 + outs[None, :], value, mask=valid[:, None] & (outs[None, :] < 4))



class FusedField:
    """A decoder and its projected planes packed for `_triplane_field_kernel`; call with flat points.

    projected: (B, 3, D, H, W) from `TriplaneDecoder.project`; bf16 packs planes and weights in bf16.
    """

    def __init__(self, projected: torch.Tensor, decoder, box_size: float, bf16: bool):
        dtype = torch.bfloat16 if bf16 else torch.float32
        first, *hidden, last = decoder.layers
        width = first.out_features
        self.bf16, self.box_size, self.width = bf16, box_size, width
        self.planes = projected.detach().permute(0, 1, 3, 4, 2).contiguous().to(dtype)  # (B, 3, H, W, D)
        self.first_bias = first.bias.detach().float().contiguous()
        if hidden:
            self.hidden_weights = torch.stack([layer.weight.detach().t() for layer in hidden]).to(dtype).contiguous()
            self.hidden_biases = torch.stack([layer.bias.detach() for layer in hidden]).float().contiguous()
        else:  # a decoder of two layers; the kernel loops zero times
            self.hidden_weights = self.hidden_biases = self.first_bias
        self.hidden_layers = len(hidden)
        last_weight = torch.zeros(width, OUT_WIDTH, device=projected.device, dtype=dtype)
        last_weight[:, : last.out_features] = last.weight.detach().t().to(dtype)
        last_bias = torch.zeros(OUT_WIDTH, device=projected.device)
        last_bias[: last.out_features] = last.bias.detach().float()
        self.last_weight, self.last_bias = last_weight, last_bias

    def __call__(self, points: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points (N, 3) with item (N,) the batch index of each -> raw density (N, 1), colour (N, 3), fp32."""
        points = points.float().contiguous()
        item = item.to(torch.int32).contiguous()
        count = points.shape[0]
        out = torch.empty(count, 4, device=points.device, dtype=torch.float32)
        if count:
            height, width = self.planes.shape[2:4]
            grid = (triton.cdiv(count, BLOCK),)
            _triplane_field_kernel[grid](
                points, item, self.planes, self.first_bias, self.hidden_weights, self.hidden_biases,
                self.last_weight, self.last_bias, out, count, height, width, 2.0 / self.box_size,
                D=self.width, HIDDEN_LAYERS=self.hidden_layers, OUT=OUT_WIDTH, BLOCK_SIZE=BLOCK, BF16=self.bf16,
                num_warps=NUM_WARPS,
            )
        return out[:, :1], out[:, 1:]
