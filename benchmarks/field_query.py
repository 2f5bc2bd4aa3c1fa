"""Triplane field queries a second: the unfused torch path against the one-kernel query (fused_field.py).

    python benchmarks/field_query.py [--points 4194304] [--blocks 16 32] [--warps 2 4] [--preset vfusion3d]

Released sizes by default (64x64 planes of 80 channels projected to 64, decoder 64 wide), random points in
the box, no gradients. Prints the median time of `--repeats` calls after a warm-up, points a second, and
the largest difference from the unfused fp32 query. On a CPU without CUDA, run with TRITON_INTERPRET=1 and
the tiny preset to check the script.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm import fused_field

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
    parser.add_argument("--preset", default="vfusion3d", choices=["vfusion3d", "tiny"])
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LRMConfig.preset(args.preset)
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


if __name__ == "__main__":
    main()
