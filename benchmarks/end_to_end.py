"""End to end: one image file -> textured GLB + 160-frame MP4 on disk; a folder of images -> images/s; peak memory.

    python benchmarks/end_to_end.py [--repeats 3] [--images 64] [--modes default bf16 bf16-compile released]
                                    [--memory-cap 6]

Each mode runs `ImageTo3D.run(path, out_dir=...)` as `infer` does with the GPU's auto settings (160 frames at
384^2, a 512^3 grid, at most 30,000 faces, a 1024^2 texture, the per-face unwrap unless `--unwrap`):
- default: what `infer` does with no flags (float32);
- bf16: `--dtype bfloat16`;
- bf16-compile: `--dtype bfloat16 --compile`;
- released: the released way, from the same image file: float32, the released decoder computation, one frame a
  render call, no empty-space skipping, a dense grid, marching cubes on the CPU, vertex colours, OBJ; the video
  written after the last frame.
Time from the image file to the last file renamed into place, CUDA synchronised: a warm-up run (compiling and
CUDA-graph capture in bf16-compile), then the median of `--repeats`. The folder: `--images` different images
through one engine, all files written, images/s. Peak: the most GPU memory allocated during a run, the
weights included. `--memory-cap GiB` lets PyTorch use no more than that (`set_per_process_memory_fraction`), as
a card of that size would; the renderer sizes its passes to it (`inference.max_rays_for`).

Released sizes with random weights; image -> planes runs the real network on the image, then its output is
swapped for planes holding a sphere of radius 0.5 (`analytic.write_sphere`), since random weights give fog
with no surface and no empty space to skip: the turntable, mesh and texture then do the work a real object gives.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vfusion3d_lightning.geometry.mesh import export_mesh, extract_mesh
from vfusion3d_lightning.inference import ImageTo3D, auto_settings, write_video
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.analytic import write_sphere

CUDA = torch.cuda.is_available()
MODES = ("default", "bf16", "bf16-compile", "released")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def write_image(path: Path, seed: int) -> Path:
    """An RGBA cut-out (its alpha is the mask, as `infer` takes it): a coloured blob on transparency."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:512, :512] / 512
    blob = (x - 0.5 + rng.normal(0, 0.03)) ** 2 + (y - 0.5) ** 2 < 0.3**2
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[..., :3] = rng.integers(40, 220, 3)
    rgba[..., :3] = (rgba[..., :3] * (0.6 + 0.4 * x[..., None])).astype(np.uint8)
    rgba[..., 3] = blob * 255
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def engine_for(mode: str, preset: str = "vfusion3d") -> ImageTo3D:
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name(preset)).eval()
    sphere = write_sphere(model, radius=0.5)
    if mode == "released":
        model.renderer.project_planes = False  # the released decoder computation
    dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float32
    engine = ImageTo3D(model, "cuda" if CUDA else "cpu", dtype, compile=mode == "bf16-compile")
    sphere = sphere.to(engine.device)
    network = engine.planes

    def planes(image: torch.Tensor) -> torch.Tensor:
        network(image)  # timed, then swapped (module docstring)
        return sphere.clone()

    engine.planes = planes
    return engine


def released_run(engine: ImageTo3D, image: Path, out: Path, settings: dict) -> list[Path]:
    """The released inference's steps: planes, frames one a call without skipping, MP4, dense grid + marching
    cubes + vertex colours, OBJ."""
    from vfusion3d_lightning.data.preprocess import preprocess

    tensor = preprocess(image, engine.input_size, engine.border_ratio, engine.background)
    planes = engine.planes(tensor)
    frames = engine.turntable(planes, settings["frames"], settings["render_size"], frames_per_batch=1,
                              max_rays=settings["render_size"] ** 2, skip_empty=False)
    files = [write_video(frames, out / "turntable.mp4", settings["fps"])]
    mesh = extract_mesh(engine.model, planes, settings["mesh_resolution"], 1.0, "dense", surface="marching_cubes")
    files.append(export_mesh(mesh, out / "mesh.obj"))
    return files


def run_once(mode: str, engine: ImageTo3D, image: Path, out: Path, unwrap: str, timings: dict) -> float:
    settings = auto_settings(engine.device)
    sync()
    start = time.perf_counter()
    if mode == "released":
        released_run(engine, image, out, settings)
    else:
        engine.run(image, out_dir=out, unwrap=unwrap, timings=timings)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=64, help="images in the folder run (0: none)")
    parser.add_argument("--unwrap", default="per_face", choices=("per_face", "xatlas"))
    parser.add_argument("--memory-cap", type=float, help="GiB PyTorch may use on the GPU")
    parser.add_argument("--preset", default="vfusion3d", help="network sizes (tiny: check the script on a CPU)")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name() if CUDA else 'CPU'}, torch {torch.__version__}, {args.preset} sizes, "
          f"auto settings {auto_settings('cuda' if CUDA else 'cpu')}, unwrap {args.unwrap}", flush=True)
    if args.memory_cap and CUDA:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap * 2**30 / total)
        print(f"# PyTorch capped at {args.memory_cap} GiB of {total / 2**30:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        images = [write_image(folder / f"image{i:03d}.png", i) for i in range(max(args.images, 1))]
        for mode in args.modes:
            engine = engine_for(mode, args.preset)
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            timings: dict = {}
            warm = run_once(mode, engine, images[0], folder / mode / "warm", args.unwrap, timings)
            repeats = 1 if mode == "released" else args.repeats
            times, steps = [], []
            for i in range(repeats):
                timings = {}
                times.append(run_once(mode, engine, images[0], folder / mode / f"run{i}", args.unwrap, timings))
                steps.append(timings)
            peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
            written = sorted(p.name for p in (folder / mode / "run0").iterdir())
            sizes = {p.name: p.stat().st_size for p in (folder / mode / "run0").iterdir()}
            line = f"{mode}: warm-up {warm:.2f} s, runs {' '.join(f'{t:.3f}' for t in times)} s, peak {peak:.2f} GiB"
            if steps[0]:
                medians = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
                line += ", steps " + " ".join(f"{k} {v * 1e3:.0f}" for k, v in medians.items()) + " ms"
            print(line, f"files {written} bytes {sizes}", flush=True)
            rate = None
            if args.images and mode != "released":
                sync()
                start = time.perf_counter()
                for image in images[:args.images]:
                    engine.run(image, out_dir=folder / mode / "folder" / image.stem, unwrap=args.unwrap)
                sync()
                rate = args.images / (time.perf_counter() - start)
                print(f"{mode}: {args.images} images at {rate:.2f} images/s", flush=True)
            rows.append((mode, statistics.median(times), rate, peak))
            del engine
            if CUDA:
                torch.cuda.empty_cache()
    print("| mode | one image -> files | folder, images/s | peak GiB |")
    print("| --- | --- | --- | --- |")
    for mode, seconds, rate, peak in rows:
        print(f"| {mode} | {seconds:.3f} s | {'-' if rate is None else f'{rate:.2f}'} | {peak:.2f} |")


if __name__ == "__main__":
    main()
