"""Inference timings: image -> planes, a 160-frame turntable, the 512^3 mesh grid; released-style and ours.

    python benchmarks/infer.py [--frames 160] [--size 384] [--grid 512]

Released-style: fp32, one turntable frame per call, dense density grid. Ours: frames batched per call with a
bounded ray count, coarse-to-fine grid, and the same in bf16 autocast (with its difference from fp32).
Random weights of the released sizes; the timings do not depend on the weight values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vfusion3d_lightning.inference import ImageTo3D
from vfusion3d_lightning.mesh import coarse_to_fine_grid, density_grid
from vfusion3d_lightning.models.lrm import LRM, LRMConfig


def timed(fn, repeats: int = 1):
    """(last result, median seconds) with CUDA synchronised around each run."""
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--grid", type=int, default=512)
    parser.add_argument("--frames-per-batch", type=int, default=8)
    parser.add_argument("--max-rays", type=int, default=2**16, help="rays per renderer pass (ours)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LRM(LRMConfig.vfusion3d()).cuda().eval()
    fp32 = ImageTo3D(model, "cuda", torch.float32)
    bf16 = ImageTo3D(model, "cuda", torch.bfloat16)
    image = torch.rand(3, 512, 512)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, released sizes, random weights")
    for engine in (fp32, bf16):
        engine.planes(image)  # warm-up
    planes, t_planes = timed(lambda: fp32.planes(image), 5)
    planes_bf16, t_planes_bf16 = timed(lambda: bf16.planes(image), 5)
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)
    released, t_released = timed(lambda: fp32.turntable(planes, args.frames, args.size, frames_per_batch=1,
                                                        max_rays=args.size**2))
    peak_released = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(1)
    ours, t_ours = timed(lambda: fp32.turntable(planes, args.frames, args.size, args.frames_per_batch,
                                                max_rays=args.max_rays))
    peak_ours = torch.cuda.max_memory_allocated() / 2**30
    torch.manual_seed(1)
    ours_bf16, t_ours_bf16 = timed(lambda: bf16.turntable(planes, args.frames, args.size, args.frames_per_batch,
                                                          max_rays=args.max_rays))
    _, t_dense = timed(lambda: density_grid(model, planes, args.grid))
    _, t_c2f = timed(lambda: coarse_to_fine_grid(model, planes, args.grid))
    print("| step | released-style (fp32) | ours fp32 | ours bf16 |")
    print("| --- | --- | --- | --- |")
    print(f"| image -> planes | {t_planes * 1e3:.0f} ms | {t_planes * 1e3:.0f} ms | {t_planes_bf16 * 1e3:.0f} ms |")
    print(f"| {args.frames}-frame {args.size}^2 turntable | {t_released:.2f} s (1 frame a call, peak "
          f"{peak_released:.1f} GiB) | {t_ours:.2f} s ({args.frames_per_batch} frames a call, peak {peak_ours:.1f} GiB)"
          f" | {t_ours_bf16:.2f} s |")
    print(f"| {args.grid}^3 density grid | {t_dense:.2f} s (dense) | {t_c2f:.2f} s (coarse-to-fine) | - |")
    print(f"bf16 vs fp32: planes max |diff| {(planes_bf16 - planes).abs().max():.3g} (planes std "
          f"{planes.std():.3g}); frames mean |diff| {(ours_bf16 - ours).abs().mean():.4f}, max "
          f"{(ours_bf16 - ours).abs().max():.3f}; fp32 batched vs one-per-call frames mean |diff| "
          f"{(ours - released).abs().mean():.4f} (stratified sampling noise)")


if __name__ == "__main__":
    main()
