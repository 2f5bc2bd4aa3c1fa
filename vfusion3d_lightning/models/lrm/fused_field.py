"""One Triton kernel for a triplane field query: sampling, plane sum and the decoder MLP; and one for its
backward pass into the planes and decoder (training).

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

The backward kernel recomputes each block's forward pass rather than reading activations from memory; each
program loops over blocks, keeping the decoder's gradients in registers, and adds the plane gradients by
relaxed atomics.

Runs on CUDA, and on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with CUDA builds of torch; without it the unfused path runs
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 32  # samples a program; measured on an H100 (benchmarks/field_query.py)
# (64 samples with 4 warps hit an illegal memory access in bf16 under Triton 3.6, cause not found)
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
                out = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                             input_precision="ieee")
            else:
                out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            out = tl.dot(a, b, input_precision="ieee")
        return out

    @triton.jit
    def _cell(u, v, height, width):
        """grid_sample's source cell (align_corners=False) of coordinates u (width), v (height) in [-1, 1]:
        its low corner and the fractions towards the high one."""
        x = ((u + 1.0) * width - 1.0) * 0.5
        y = ((v + 1.0) * height - 1.0) * 0.5
        x_floor = tl.floor(x)
        y_floor = tl.floor(y)
        return x_floor.to(tl.int32), y_floor.to(tl.int32), x - x_floor, y - y_floor

    @triton.jit
    def _corner(x0, y0, fx, fy, dx: tl.constexpr, dy: tl.constexpr, height, width, valid, D: tl.constexpr):
        """Bilinear weight, whether it lies on the plane (zero padding outside), and offset of one corner."""
        xi = x0 + dx
        yi = y0 + dy
        weight = (fx * dx + (1.0 - fx) * (1 - dx)) * (fy * dy + (1.0 - fy) * (1 - dy))
        inside = valid & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        return weight, inside, (yi * width + xi).to(tl.int64) * D

    @triton.jit
    def _bilinear(plane, u, v, height, width, cols, valid, D: tl.constexpr):
        """Features (BLOCK, D) at grid coordinates u (width) and v (height) in [-1, 1]: grid_sample with
        align_corners=False and zero padding."""
        x0, y0, fx, fy = _cell(u, v, height, width)
        acc = tl.zeros((u.shape[0], D), dtype=tl.float32)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                weight, inside, offsets = _corner(x0, y0, fx, fy, dx, dy, height, width, valid, D)
                corner = tl.load(plane + offsets[:, None] + cols[None, :], mask=inside[:, None], other=0.0)
                acc += weight[:, None] * corner.to(tl.float32)
        return acc

    @triton.jit
    def _hidden_layer(hidden, hidden_weights, hidden_biases, cols, layer: tl.constexpr, D: tl.constexpr,
                      BF16: tl.constexpr):
        """Hidden layer `layer` (linear, ReLU) of a (BLOCK, D) activation."""
        weight = tl.load(hidden_weights + layer * D * D + cols[:, None] * D + cols[None, :])  # (in, out)
        bias = tl.load(hidden_biases + layer * D + cols).to(tl.float32)
        return tl.maximum(_dot(hidden, weight, BF16) + bias[None, :], 0.0)

    @triton.jit
    def _hidden_activation(first, hidden_weights, hidden_biases, cols, LAYERS: tl.constexpr, D: tl.constexpr,
                           BF16: tl.constexpr):
        """The activation after the first `LAYERS` hidden layers, from the first layer's (BLOCK, D)."""
        hidden = first
        for layer in tl.static_range(LAYERS):
            hidden = _hidden_layer(hidden, hidden_weights, hidden_biases, cols, layer, D, BF16)
        return hidden

    @triton.jit
    def _first_layer(points, item, planes, first_bias, rows, valid, height, width, scale, cols, D: tl.constexpr):
        """A block's sampling coordinates, batch items and first-layer activation (BLOCK, D)."""
        # the casts keep fp32 where torch.compile passes the Python float `scale` as fp64
        x = (tl.load(points + rows * 3 + 0, mask=valid, other=0.0) * scale).to(tl.float32)
        y = (tl.load(points + rows * 3 + 1, mask=valid, other=0.0) * scale).to(tl.float32)
        z = (tl.load(points + rows * 3 + 2, mask=valid, other=0.0) * scale).to(tl.float32)
        batch = tl.load(item + rows, mask=valid, other=0).to(tl.int64)
        plane_size = height * width * D
        base = planes + batch[:, None] * (3 * plane_size)
        # planes XY, XZ, ZY (renderer.PLANE_AXES)
        hidden = _bilinear(base, x, y, height, width, cols, valid, D)
        hidden += _bilinear(base + plane_size, x, z, height, width, cols, valid, D)
        hidden += _bilinear(base + 2 * plane_size, z, y, height, width, cols, valid, D)
        return x, y, z, batch, tl.maximum(hidden + tl.load(first_bias + cols)[None, :], 0.0)

    @triton.jit
    def _triplane_field_kernel(points, item, planes, first_bias, hidden_weights, hidden_biases, last_weight,
                               last_bias, out, count, height, width, scale,
                               D: tl.constexpr, HIDDEN_LAYERS: tl.constexpr, OUT: tl.constexpr,
                               BLOCK_SIZE: tl.constexpr, BF16: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        valid = rows < count
        cols = tl.arange(0, D)
        _, _, _, _, first = _first_layer(points, item, planes, first_bias, rows, valid, height, width, scale, cols, D)
        hidden = _hidden_activation(first, hidden_weights, hidden_biases, cols, HIDDEN_LAYERS, D, BF16)
        outs = tl.arange(0, OUT)
        weight = tl.load(last_weight + cols[:, None] * OUT + outs[None, :])
        raw = _dot(hidden, weight, BF16) + tl.load(last_bias + outs).to(tl.float32)[None, :]
        # column 0 is the raw density; 1..3 the colour through MipNeRF's widened sigmoid (renderer._outputs)
        value = tl.where(outs[None, :] == 0, raw, tl.sigmoid(raw) * 1.002 - 0.001)
        tl.store(out + rows[:, None] * 4 + outs[None, :], value, mask=valid[:, None] & (outs[None, :] < 4))

    @triton.jit
    def _bilinear_scatter(plane, u, v, height, width, cols, valid, grad, D: tl.constexpr):
        """The adjoint of `_bilinear`: adds grad (BLOCK, D) into the 4 corners of each sample. Relaxed atomics:
        no program reads the sums, and acq_rel (Triton's default) fences each add."""
        x0, y0, fx, fy = _cell(u, v, height, width)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                weight, inside, offsets = _corner(x0, y0, fx, fy, dx, dy, height, width, valid, D)
                tl.atomic_add(plane + offsets[:, None] + cols[None, :], weight[:, None] * grad, mask=inside[:, None],
                              sem="relaxed")

    @triton.jit
    def _block_gradients(points, item, planes, first_bias, hidden_weights, hidden_biases, last_weight, last_bias,
                         upstream, grad_planes, rows, valid, cols, height, width, scale,
                         D: tl.constexpr, HIDDEN_LAYERS: tl.constexpr, OUT: tl.constexpr, BF16: tl.constexpr):
        """Recomputes one block's forward pass, adds its plane gradients into `grad_planes` by atomics and
        returns its decoder gradients: (last weight, last bias, hidden weights, hidden biases, first bias).
        upstream: the block's output gradients (BLOCK, OUT), zero past the 4 outputs."""
        x, y, z, batch, first = _first_layer(points, item, planes, first_bias, rows, valid, height, width, scale,
                                             cols, D)
        # each layer's activation kept (BLOCK x D floats a layer): recomputing them cost O(layers^2) products
        activations = (first,)
        for layer in tl.static_range(HIDDEN_LAYERS):
            activations = activations + (_hidden_layer(activations[layer], hidden_weights, hidden_biases, cols,
                                                       layer, D, BF16),)
        last_hidden = activations[HIDDEN_LAYERS]
        outs = tl.arange(0, OUT)
        weight = tl.load(last_weight + cols[:, None] * OUT + outs[None, :])
        raw = _dot(last_hidden, weight, BF16) + tl.load(last_bias + outs).to(tl.float32)[None, :]
        sigmoid = tl.sigmoid(raw)
        grad = tl.where(outs[None, :] == 0, upstream, upstream * sigmoid * (1.0 - sigmoid) * 1.002)
        grad_last_weight = _dot(tl.trans(last_hidden), grad, BF16)
        grad_last_bias = tl.sum(grad, axis=0)
        grad_hidden = _dot(grad, tl.trans(weight), BF16)  # (BLOCK, D)
        grad_weights = ()
        grad_biases = ()
        for layer in tl.static_range(HIDDEN_LAYERS - 1, -1, -1):  # last hidden layer first
            grad_hidden = tl.where(activations[layer + 1] > 0, grad_hidden, 0.0)
            grad_weights = (_dot(tl.trans(activations[layer]), grad_hidden, BF16),) + grad_weights
            grad_biases = (tl.sum(grad_hidden, axis=0),) + grad_biases
            offsets = layer * D * D + cols[:, None] * D + cols[None, :]
            grad_hidden = _dot(grad_hidden, tl.trans(tl.load(hidden_weights + offsets)), BF16)
        grad_first = tl.where(first > 0, grad_hidden, 0.0)
        plane_size = height * width * D
        grad_base = grad_planes + batch[:, None] * (3 * plane_size)
        _bilinear_scatter(grad_base, x, y, height, width, cols, valid, grad_first, D)
        _bilinear_scatter(grad_base + plane_size, x, z, height, width, cols, valid, grad_first, D)
        _bilinear_scatter(grad_base + 2 * plane_size, z, y, height, width, cols, valid, grad_first, D)
        return grad_last_weight, grad_last_bias, grad_weights, grad_biases, tl.sum(grad_first, axis=0)

    @triton.jit
    def _triplane_field_backward_kernel(points, item, planes, first_bias, hidden_weights, hidden_biases,
                                        last_weight, last_bias, grad_out, grad_planes, grad_first_bias,
                                        grad_hidden_weights, grad_hidden_biases, grad_last_weight, grad_last_bias,
                                        count, height, width, scale, copy_size, copies,
                                        D: tl.constexpr, HIDDEN_LAYERS: tl.constexpr, OUT: tl.constexpr,
                                        BLOCK_SIZE: tl.constexpr, BF16: tl.constexpr, SKIP_EMPTY: tl.constexpr):
        """Each program takes a contiguous run of blocks of samples and keeps its decoder gradients in
        registers, adding them to memory once at the end: a block's atomics into the same few thousand
        weights would otherwise queue behind every other block's. Plane gradients go by atomics into copy
        (program % copies) of `grad_planes`, which spreads colliding texels."""
        program = tl.program_id(0)
        cols = tl.arange(0, D)
        outs = tl.arange(0, OUT)
        acc_last_weight = tl.zeros((D, OUT), dtype=tl.float32)
        acc_last_bias = tl.zeros((OUT,), dtype=tl.float32)
        acc_first_bias = tl.zeros((D,), dtype=tl.float32)
        acc_weights = ()
        acc_biases = ()
        for _layer in tl.static_range(HIDDEN_LAYERS):
            acc_weights = acc_weights + (tl.zeros((D, D), dtype=tl.float32),)
            acc_biases = acc_biases + (tl.zeros((D,), dtype=tl.float32),)
        grad_copy = grad_planes + (program % copies) * copy_size
        # a contiguous run of blocks a program: strided blocks lined up with the rays, so that the blocks without
        # gradient (the ends of rays) fell to the same programs while others took every full one
        blocks = tl.cdiv(count, BLOCK_SIZE)
        per_program = tl.cdiv(blocks, tl.num_programs(0))
        first_block = program * per_program
        for block in range(first_block, tl.minimum(first_block + per_program, blocks)):
            rows = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
            valid = rows < count
            upstream = tl.load(grad_out + rows[:, None] * 4 + outs[None, :],
                               mask=valid[:, None] & (outs[None, :] < 4), other=0.0)
            # a block without upstream gradient adds nothing: samples outside the box (rays that miss it) and
            # behind opaque ones (their transmittance underflowed to 0). In bf16 only: the branch made the fp32
            # kernel spill more: 45 against 56 ms with nothing to skip (BENCHMARKS.md)
            if SKIP_EMPTY:
                live = tl.max(tl.max(tl.abs(upstream), axis=1), axis=0) > 0.0
            else:
                live = True
            if live:
                last_w, last_b, weights, biases, first_b = _block_gradients(
                    points, item, planes, first_bias, hidden_weights, hidden_biases, last_weight, last_bias,
                    upstream, grad_copy, rows, valid, cols, height, width, scale, D, HIDDEN_LAYERS, OUT, BF16)
                acc_last_weight += last_w
                acc_last_bias += last_b
                acc_first_bias += first_b
                summed_weights = ()
                summed_biases = ()
                for layer in tl.static_range(HIDDEN_LAYERS):
                    summed_weights = summed_weights + (acc_weights[layer] + weights[layer],)
                    summed_biases = summed_biases + (acc_biases[layer] + biases[layer],)
                acc_weights = summed_weights
                acc_biases = summed_biases
        # relaxed: nothing in the kernel reads these sums, and Triton's default (acq_rel) fences every add
        tl.atomic_add(grad_last_weight + cols[:, None] * OUT + outs[None, :], acc_last_weight, sem="relaxed")
        tl.atomic_add(grad_last_bias + outs, acc_last_bias, sem="relaxed")
        tl.atomic_add(grad_first_bias + cols, acc_first_bias, sem="relaxed")
        for layer in tl.static_range(HIDDEN_LAYERS):
            tl.atomic_add(grad_hidden_weights + layer * D * D + cols[:, None] * D + cols[None, :], acc_weights[layer],
                          sem="relaxed")
            tl.atomic_add(grad_hidden_biases + layer * D + cols, acc_biases[layer], sem="relaxed")


GRADIENT_COPIES = 8  # copies of the plane gradient that programs add into in turn (fewer colliding atomics)
# the backward kernel's launch, bf16 and fp32: (samples a block, warps, programs a multiprocessor, each looping
# over blocks); fastest of those tried on an H100 on samples along rays, as rendered (benchmarks/field_query.py
# --backward --along-rays). The kernel holds 255 registers a thread, so a multiprocessor runs 8 warps whatever
# the launch; capping registers (maxnreg) spilled more and ran slower. 64 samples with 8 warps gave wrong gradients
# (NaN) under Triton 3.6, cause not found: check any new launch with field_query.py's gradient error column.
BACKWARD_LAUNCH = {True: (16, 4, 4), False: (16, 8, 1)}


def _launch_forward(points, item, packed, settings) -> torch.Tensor:
    box_size, bf16, hidden_layers = settings
    planes, first_bias, hidden_weights, hidden_biases, last_weight, last_bias = packed
    count = points.shape[0]
    out = torch.empty(count, 4, device=points.device, dtype=torch.float32)
    if count:
        height, width, channels = planes.shape[2:]
        _triplane_field_kernel[(triton.cdiv(count, BLOCK),)](
            points, item, planes, first_bias, hidden_weights, hidden_biases, last_weight, last_bias, out, count,
            height, width, 2.0 / box_size, D=channels, HIDDEN_LAYERS=hidden_layers, OUT=OUT_WIDTH, BLOCK_SIZE=BLOCK,
            BF16=bf16, num_warps=NUM_WARPS)
    return out


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: a few programs, so that the tests cover the loop over blocks


class _FusedQuery(torch.autograd.Function):
    """The kernel with gradients for the packed planes and decoder (none for the points)."""

    @staticmethod
    def forward(ctx, points, item, settings, *packed):
        ctx.save_for_backward(points, item, *packed)
        ctx.settings = settings
        return _launch_forward(points, item, packed, settings)

    @staticmethod
    def backward(ctx, grad_out):
        points, item, *packed = ctx.saved_tensors
        box_size, bf16, hidden_layers = ctx.settings
        planes = packed[0]
        grads = [torch.zeros((GRADIENT_COPIES, *planes.shape), device=planes.device)]
        grads += [torch.zeros(t.shape, device=t.device) for t in packed[1:]]
        count = points.shape[0]
        if count:
            height, width, channels = planes.shape[2:]
            block, warps, programs_per_sm = BACKWARD_LAUNCH[bf16]
            programs = min(triton.cdiv(count, block), programs_per_sm * _multiprocessors(planes.device))
            _triplane_field_backward_kernel[(programs,)](
                points, item, *packed, grad_out.float().contiguous(), *grads, count, height, width, 2.0 / box_size,
                planes.numel(), GRADIENT_COPIES, D=channels, HIDDEN_LAYERS=hidden_layers, OUT=OUT_WIDTH,
                BLOCK_SIZE=block, BF16=bf16, SKIP_EMPTY=bf16, num_warps=warps)
        grads[0] = grads[0].sum(dim=0)
        return (None, None, None, *(g.to(t.dtype) for g, t in zip(grads, packed)))


class FusedField:
    """A decoder and its projected planes packed for `_triplane_field_kernel`; call with flat points.

    projected: (B, 3, D, H, W) from `TriplaneDecoder.project`; bf16 packs planes and weights in bf16.
    """

    def __init__(self, projected: torch.Tensor, decoder, box_size: float, bf16: bool):
        dtype = torch.bfloat16 if bf16 else torch.float32
        first, *hidden, last = decoder.layers
        # packed by differentiable ops, so that gradients of the packed tensors reach planes and decoder
        planes = projected.permute(0, 1, 3, 4, 2).contiguous().to(dtype)  # (B, 3, H, W, D)
        first_bias = first.bias.float().contiguous()
        if hidden:
            hidden_weights = torch.stack([layer.weight.t() for layer in hidden]).to(dtype).contiguous()
            hidden_biases = torch.stack([layer.bias for layer in hidden]).float().contiguous()
        else:  # a decoder of two layers; the kernel loops zero times over these stand-ins
            hidden_weights = hidden_biases = torch.zeros(1, device=projected.device)
        last_weight = F.pad(last.weight.t(), (0, OUT_WIDTH - last.out_features)).to(dtype).contiguous()
        last_bias = F.pad(last.bias.float(), (0, OUT_WIDTH - last.out_features))
        self.packed = (planes, first_bias, hidden_weights, hidden_biases, last_weight, last_bias)
        self.settings = (box_size, bf16, len(hidden))

    def __call__(self, points: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points (N, 3) with item (N,) the batch index of each -> raw density (N, 1), colour (N, 3), fp32.
        Differentiable in the planes and decoder when gradients are on."""
        points = points.detach().float().contiguous()
        item = item.to(torch.int32).contiguous()
        if torch.is_grad_enabled() and any(t.requires_grad for t in self.packed):
            out = _FusedQuery.apply(points, item, self.settings, *self.packed)
        else:
            out = _launch_forward(points, item, self.packed, self.settings)
        return out[:, :1], out[:, 1:]
