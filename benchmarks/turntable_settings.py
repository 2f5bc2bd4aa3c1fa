"""`ImageTo3D.turntable` timings by frames a call and rays a pass, with and without an MP4 written as it renders.

    python benchmarks/turntable_settings.py [--compile] [--frames-per-batch 8 16 32] [--max-rays 0 262144]

Released sizes, bf16, a sphere of radius 0.5 written into the decoder and planes (`analytic.write_sphere`);
160 frames at 384^2 with empty-space skipping, as `infer` renders them on a GPU. `--max-rays 0` is the engine's
own choice (`inference.max_rays_for`). Each setting: a warm-up, then the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vfusion3d_lightning.inference import FrameStream, ImageTo3D, write_video
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.analytic import write_sphere


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames-per-batch", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--max-rays", type=int, nargs="+", default=[0, 2**18])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--preset", default="vfusion3d")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name(args.preset)).eval()
    planes = write_sphere(model, radius=0.5)
    engine = ImageTo3D(model, device, torch.bfloat16, compile=args.compile)
    planes = planes.to(device)
    print(f"# {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"compile={args.compile}, engine's max_rays {engine.max_rays()}", flush=True)
    print("| frames a call | rays a pass | turntable s | with the MP4 written as it renders s |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(1) as writer:
        for per_batch in args.frames_per_batch:
            for rays in args.max_rays:
                def render(stream=None):
                    engine.turntable(planes, 160, 384, per_batch, max_rays=rays or None,
                                     on_batch=stream.put if stream else None)

                def streamed():
                    stream = FrameStream()
                    stream.reader = writer.submit(write_video, stream, Path(folder) / "turntable.mp4", 40)
                    render(stream)
                    stream.close()
                    stream.reader.result()

                times = {}
                for name, fn in (("plain", render), ("streamed", streamed)):
                    fn()
                    runs = []
                    for _ in range(args.repeats):
                        torch.cuda.synchronize() if device == "cuda" else None
                        start = time.perf_counter()
                        fn()
                        torch.cuda.synchronize() if device == "cuda" else None
                        runs.append(time.perf_counter() - start)
                    times[name] = statistics.median(runs)
                print(f"| {per_batch} | {rays or 'engine'} | {times['plain']:.3f} | {times['streamed']:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
