"""Decode throughput of multi-view shards: samples/s for one worker, and for a DataLoader with N workers.

    python benchmarks/data_decode.py --sizes 256 512 --views 16 --samples 48 --workers 2

Views are anti-aliased coloured shapes on a transparent background (like renders), stored as RGBA PNG.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from vfusion3d_lightning.cameras import Intrinsics, orbit_azimuths, orbit_poses
from vfusion3d_lightning.data.datamodules import LRMViews, ShardStream, ViewTransform
from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter, complete_shards


def render_like_view(rng: np.random.Generator, size: int) -> np.ndarray:
    """An object-like RGBA view: a few shaded ellipses and polygons, supersampled for soft edges."""
    big = Image.new("RGBA", (2 * size, 2 * size), (255, 255, 255, 0))
    draw = ImageDraw.Draw(big)
    for _ in range(int(rng.integers(2, 5))):
        box = np.sort(rng.uniform(0.25, 0.75, 4).reshape(2, 2), axis=0).reshape(-1) * 2 * size
        colour = tuple(int(c) for c in rng.integers(0, 255, 3)) + (255,)
        draw.ellipse(box.tolist(), fill=colour)
    view = np.asarray(big.resize((size, size), Image.Resampling.LANCZOS)).copy()
    noise = rng.normal(0, 6, view.shape[:2] + (3,))  # texture, so PNG compresses like a real render
    view[..., :3] = np.clip(view[..., :3] + noise * (view[..., 3:] > 0), 0, 255)
    return view


def write_dataset(directory: Path, size: int, views: int, samples: int) -> None:
    rng = np.random.default_rng(0)
    k = Intrinsics(0.75 * size, 0.75 * size, size / 2, size / 2, size, size).matrix().numpy()
    with ShardWriter(directory, maxcount=max(1, samples // 8)) as writer:
        for i in range(samples):
            writer.write_sample(MultiViewSample(
                key=f"obj{i:05d}", object_id=f"obj{i:05d}", source="3d",
                images=np.stack([render_like_view(rng, size) for _ in range(views)]),
                cam2world=orbit_poses(views, 0.3, 1.5).numpy(), intrinsics=np.repeat(k[None], views, 0),
                elevations=np.full(views, 0.3), azimuths=orbit_azimuths(views).numpy()))


class DecodeAll(ViewTransform):
    """Decodes every view and does nothing else."""

    def __call__(self, sample, rng):
        return {"n": sample.num_views}


def samples_per_second(dataset: ShardStream, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=1, num_workers=workers)
    start, count = time.perf_counter(), 0
    for _ in loader:
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
          f"{args.views} views per sample, {args.samples} samples")
    print("| view px | MB/sample | decode all views, 1 worker | LRM batch items (5 views decoded; 512 in, "
          f"384 targets), 1 worker | LRM batch items, {args.workers} workers |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            write_dataset(Path(tmp), size, args.views, args.samples)
            shards = [str(p) for p in complete_shards(tmp)]
            megabytes = sum(Path(p).stat().st_size for p in shards) / args.samples / 1e6

            def stream(transform):
                return ShardStream(shards, transform, samples_per_rank=args.samples, shuffle=False)

            decode = samples_per_second(stream(DecodeAll()), 0)
            views = LRMViews(4, True, 512, 384)
            lrm_one = samples_per_second(stream(views), 0)
            lrm_many = samples_per_second(stream(views), args.workers)
            print(f"| {size} | {megabytes:.2f} | {decode:.1f} samples/s | {lrm_one:.1f} samples/s "
                  f"| {lrm_many:.1f} samples/s |")


if __name__ == "__main__":
    main()
