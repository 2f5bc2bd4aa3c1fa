"""Triplane field queries a second: the unfused torch path against the one-kernel query (fused_field.py).

    python benchmarks/field_query.py [--points 4194304] [--blocks 16 32] [--warps 2 4] [--preset vfusion3d]
    python benchmarks/field_query.py --backward [--backward-launch 16:8:4 32:8:1] [--along-rays [--occluded]]

Released sizes by default (64x64 planes of 80 channels projected to 64, decoder 64 wide), random points in
the box. Without gradients: the median time of `--repeats` queries after a warm-up, points a second, and the
largest difference from the unfused fp32 query. With `--backward`: a query and its backward pass into the
planes and decoder (as in training), against autograd through the unfused query in float64; the error is
the largest over the gradient tensors of max |difference| / max |reference gradient|, with that tensor. A launch is
samples-a-block:warps:programs-a-multiprocessor of the backward kernel (fused_field.BACKWARD_LAUNCH). On a CPU
without CUDA, run with TRITON_INTERPRET=1 and the tiny preset to check the script.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import triton

from vfusion3d_lightning import presets
from vfusion3d_lightning.models.lrm import LRM, LRMConfig, fused_field

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def timed(fn, repeats: int):
    out = fn()
    times = []
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=2**22)
    parser.add_argument("--blocks", type=int, nargs="+", default=[fused_field.BLOCK])
    parser.add_argument("--warps", type=int, nargs="+", default=[fused_field.NUM_WARPS])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="vfusion3d", choices=presets.network_names())
    parser.add_argument("--backward", action="store_true", help="time query + backward pass instead")
    parser.add_argument("--along-rays", action="store_true", help="--backward: points in order along rays")
    parser.add_argument("--occluded", action="store_true",
                        help="--backward --along-rays: no upstream gradient behind a random sample (from the 32nd "
                             "on) of each ray, as behind an opaque surface whose transmittance underflows to 0")
    parser.add_argument("--backward-launch", nargs="+", default=[],
                        help="launches to try, as block:warps:programs (default: fused_field.BACKWARD_LAUNCH)")
    args = parser.parse_args()
    if args.backward:
        backward(args)
        return
    torch.manual_seed(0)
    config = LRMConfig.from_name(args.preset)
    model = LRM(config).to(DEVICE).eval()
    size = config.triplane_high_res
    planes = torch.randn(1, 3, config.triplane_dim, size, size, device=DEVICE)
    points = (torch.rand(1, args.points, 3, device=DEVICE) * 2 - 1) * config.box_size / 2
    print(f"# {torch.cuda.get_device_name() if CUDA else 'CPU'}, torch {torch.__version__}, {args.preset} sizes, "
          f"{args.points} points")
    print("| path | time | points/s | max |raw density diff| | max |colour diff| |")
    print("| --- | --- | --- | --- | --- |")

    def query(fused: bool, dtype: torch.dtype):
        model.renderer.fused = fused
        with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            raw_sigma, rgb = model.renderer.query(planes, model.decoder, points)
        return raw_sigma.float(), rgb.float()

    (ref_sigma, ref_rgb), _ = timed(lambda: query(False, torch.float32), 1)
    runs = [("unfused fp32", False, torch.float32), ("unfused bf16", False, torch.bfloat16)]
    runs += [(f"fused {name} block {block} warps {warps}", True, dtype, block, warps) for block in args.blocks
             for warps in args.warps for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))]
    for name, fused, dtype, *launch in runs:
        if launch:
            fused_field.BLOCK, fused_field.NUM_WARPS = launch
        (raw_sigma, rgb), seconds = timed(lambda: query(fused, dtype), args.repeats)
        print(f"| {name} | {seconds * 1e3:.2f} ms | {args.points / seconds / 1e9:.2f} G | "
              f"{(raw_sigma - ref_sigma).abs().max():.3g} | {(rgb - ref_rgb).abs().max():.3g} |", flush=True)


def backward(args) -> None:
    torch.manual_seed(0)
    config = LRMConfig.from_name(args.preset)
    model = LRM(config).to(DEVICE).train()
    for layer in model.decoder.layers:  # zero biases (the released init) would hide bias-gradient errors
        torch.nn.init.normal_(layer.bias, std=0.1)
    size = config.triplane_high_res
    planes = torch.randn(1, 3, config.triplane_dim, size, size, device=DEVICE, requires_grad=True)
    points = (torch.rand(1, args.points, 3, device=DEVICE) * 2 - 1) * config.box_size / 2
    if args.along_rays:  # 128 samples a ray in depth order between two random points of the box, as rendered
        ends = (torch.rand(2, args.points // 128, 1, 3, device=DEVICE) * 2 - 1) * config.box_size / 2
        depths = torch.rand(args.points // 128, 128, 1, device=DEVICE).sort(dim=1).values
        points = (ends[0] + depths * (ends[1] - ends[0])).reshape(1, -1, 3)
        args.points = points.shape[1]
    upstream = torch.randn(1, args.points, 4, device=DEVICE)
    if args.occluded and args.along_rays:
        rays = args.points // 128
        surface = torch.randint(32, 128, (rays, 1), device=DEVICE)
        behind = torch.arange(128, device=DEVICE) >= surface  # (rays, 128)
        upstream = upstream * ~behind.reshape(1, -1, 1)
    exact = copy.deepcopy(model).double()  # the reference: the unfused query in float64
    print(f"# {torch.cuda.get_device_name() if CUDA else 'CPU'}, torch {torch.__version__}, {args.preset} sizes, "
          f"{args.points} points{' along rays' if args.along_rays else ''}"
          f"{f', {(upstream == 0).all(-1).float().mean():.0%} without upstream gradient' if args.occluded else ''}, "
          "query + backward")
    print("| path | time | points/s | max relative gradient error against float64 |")
    print("| --- | --- | --- | --- |")

    def gradients(fused: bool, dtype: torch.dtype, net: LRM = model):
        net.renderer.fused_training = fused
        net.zero_grad(set_to_none=True)
        leaf = planes.detach().to(torch.float64 if net is exact else torch.float32).requires_grad_()
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype == torch.bfloat16):
            raw_sigma, rgb = net.renderer.query(leaf, net.decoder, points.to(leaf.dtype))
        (torch.cat([raw_sigma, rgb], dim=-1).to(leaf.dtype) * upstream.to(leaf.dtype)).sum().backward()
        return [leaf.grad] + [p.grad for p in net.decoder.parameters()]

    names = ["planes"] + [name for name, _ in model.decoder.named_parameters()]

    def error(grads, reference) -> str:
        errors = [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, reference)]
        worst = max(range(len(errors)), key=errors.__getitem__)
        return f"{errors[worst]:.3g} ({names[worst]})"

    reference = gradients(False, torch.float64, exact)
    runs = [("unfused fp32", False, torch.float32), ("unfused bf16", False, torch.bfloat16)]
    default = dict(fused_field.BACKWARD_LAUNCH)
    for bf16, name in ((False, "fp32"), (True, "bf16")):
        launches = [tuple(int(x) for x in launch.split(":")) for launch in args.backward_launch] or [default[bf16]]
        runs += [(f"fused {name} launch {':'.join(map(str, launch))}", True,
                  torch.bfloat16 if bf16 else torch.float32, launch) for launch in launches]
    for name, fused, dtype, *launch in runs:
        if launch:
            fused_field.BACKWARD_LAUNCH[dtype == torch.bfloat16] = launch[0]
        try:
            grads, seconds = timed(lambda: gradients(fused, dtype), args.repeats)
        except triton.runtime.errors.OutOfResources as error_:  # a launch too large for the GPU
            print(f"| {name} | {type(error_).__name__} | | |", flush=True)
            continue
        print(f"| {name} | {seconds * 1e3:.2f} ms | {args.points / seconds / 1e9:.2f} G | {error(grads, reference)} |",
              flush=True)


if __name__ == "__main__":
    main()
