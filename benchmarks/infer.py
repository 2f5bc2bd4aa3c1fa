"""Inference timings, released-style and ours in one process: image -> planes, a 160-frame turntable, the mesh.

    python benchmarks/infer.py [--frames 160] [--size 384] [--grid 512] [--compile] [--repeats 3]

Released-style: fp32, the released decoder computation (240 concatenated features a sample through the whole
MLP), one turntable frame per call, dense density grid, marching cubes on the CPU. Ours: bf16 autocast, with
the network's matrix-product weights held in bf16 (`LRM.cast_network_weights`), planes projected by the
decoder's first layer once (renderer.py), the one-kernel field query (fused_field.py), `--frames-per-batch`
frames a call, empty-space skipping (`LRM.occupancy`), coarse-to-fine grid; `--compile` adds torch.compile
of the encoder/transformer (replayed as CUDA graphs) and of the ray renderer.
Each step: warm-up, then the median of `--repeats` runs (at least 10 for image -> planes) with CUDA
synchronised, and its peak memory.
Released sizes. image -> planes uses random weights (its time does not depend on them); the turntable and
the mesh use a sphere of radius 0.5 written into the decoder and planes (`analytic.write_sphere`), since
random weights give fog of one density everywhere, with no surface and no empty space.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vfusion3d_lightning import presets
from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
from vfusion3d_lightning.geometry.isosurface import nearest_vertex_distance
from vfusion3d_lightning.geometry.mesh import coarse_to_fine_grid, density_grid, extract_mesh
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.analytic import write_sphere

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the CPU runs the tiny preset, to check the script
VERBOSE = False  # --verbose: every repeat's time


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, repeats: int):
    """(last result, median seconds, peak GiB above the memory in use before) over `repeats` runs after one
    warm-up run."""
    out = fn()
    times = []
    sync()
    base = torch.cuda.memory_allocated() if CUDA else 0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if CUDA else 0.0
    if VERBOSE:
        print(f"  times: {' '.join(f'{t * 1e3:.1f}' for t in times)} ms", flush=True)
    return out, statistics.median(times), peak


def make_planes(model: LRM, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        return model(image, canonical_source_camera(1).to(DEVICE)).float().clone()  # CUDA graphs reuse the output


def turntable(model: LRM, planes: torch.Tensor, frames: int, size: int, per_call: int, max_rays: int,
              dtype: torch.dtype, seed: int = 1, skip_empty: bool = False) -> torch.Tensor:
    cameras = turntable_cameras(frames).to(DEVICE)
    generator = torch.Generator(DEVICE).manual_seed(seed)
    parts = []
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        occupancy = model.occupancy(planes) if skip_empty else None
        for start in range(0, frames, per_call):
            out = model.render(planes, cameras[start:start + per_call][None], size, generator=generator,
                               max_rays=max_rays, occupancy=occupancy)
            parts.append(out.rgb[0].float())
    return torch.cat(parts)


def profile_step(name: str, fn) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    print(f"## {name}")
    print(prof.key_averages().table(sort_by="cuda_time_total" if CUDA else "cpu_time_total", row_limit=18,
                                    max_name_column_width=50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=160)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--grid", type=int, default=512)
    parser.add_argument("--frames-per-batch", type=int, default=16)
    parser.add_argument("--max-rays", type=int, default=2**18, help="rays per renderer pass (ours)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="print every repeat's time")
    parser.add_argument("--profile", choices=["turntable", "planes"],
                        help="print the top kernels of 16 turntable frames or of image -> planes, released-style and "
                             "ours, and stop")
    parser.add_argument("--preset", default="vfusion3d", choices=presets.network_names())
    parser.add_argument("--threshold", type=float, default=1.0, help="mesh density level (the release's 1.0)")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    torch.manual_seed(0)
    config = LRMConfig.from_name(args.preset)
    released = LRM(config).to(DEVICE).eval()
    released.renderer.project_planes = False
    ours = LRM(config).to(DEVICE).eval()
    ours.load_state_dict(released.state_dict())
    sphere = write_sphere(ours)
    released.decoder.load_state_dict(ours.decoder.state_dict())
    ours.cast_network_weights(torch.bfloat16)  # ours runs under bf16 autocast: its casts made once
    if args.compile:
        ours.compile_for_speed(cuda_graphs=CUDA)
    size = config.encoder_img_size or 512
    image = torch.rand(1, 3, size, size, device=DEVICE)
    print(f"# {torch.cuda.get_device_name() if CUDA else 'CPU'}, torch {torch.__version__}, {args.preset} sizes, "
          f"random weights, compile={args.compile}", flush=True)
    rows = []
    if args.profile == "planes":
        for name, model, dtype in (("released-style", released, torch.float32), ("ours", ours, torch.bfloat16)):
            profile_step(name, lambda: make_planes(model, image, dtype))
        return
    if args.profile:
        for name, model, per_call, rays, dtype, skip in (
                ("released-style", released, 1, args.size**2, torch.float32, False),
                ("ours", ours, args.frames_per_batch, args.max_rays, torch.bfloat16, True)):
            profile_step(name, lambda: turntable(model, sphere, 16, args.size, per_call, rays, dtype,
                                                      skip_empty=skip))
        return

    # at least 10 repeats: a ~10 ms step, and with CUDA graphs the first repeat records the graph
    planes_repeats = max(args.repeats, 10)
    planes, t_ref, m_ref = timed(lambda: make_planes(released, image, torch.float32), planes_repeats)
    planes_bf16, t_fast, m_fast = timed(lambda: make_planes(ours, image, torch.bfloat16), planes_repeats)
    rows.append(("image -> planes", t_ref, m_ref, t_fast, m_fast, "ms"))
    print(rows[-1], flush=True)  # as they come: a killed run still reports
    planes_error, planes_std = (planes_bf16 - planes).abs().max().item(), planes.std().item()

    planes = sphere
    frames_ref, t_ref, m_ref = timed(lambda: turntable(released, planes, args.frames, args.size, 1, args.size**2,
                                                       torch.float32), 1)
    print(f"released-style turntable {t_ref:.2f} s", flush=True)

    def ours_turntable(dtype, seed=1, skip_empty=True):
        return turntable(ours, planes, args.frames, args.size, args.frames_per_batch, args.max_rays, dtype, seed,
                         skip_empty)

    frames_full, t_full, m_full = timed(lambda: ours_turntable(torch.bfloat16, skip_empty=False), args.repeats)
    print(f"ours bf16 turntable without skipping {t_full:.2f} s, peak {m_full:.1f} GiB", flush=True)
    frames_fast, t_fast, m_fast = timed(lambda: ours_turntable(torch.bfloat16), args.repeats)
    frames_fp32, t_fp32, m_fp32 = timed(lambda: ours_turntable(torch.float32, skip_empty=False), 1)
    print(f"ours fp32 turntable without skipping {t_fp32:.2f} s, peak {m_fp32:.1f} GiB", flush=True)
    frames_noise = ours_turntable(torch.float32, seed=2, skip_empty=False)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        occupied = ours.occupancy(planes).fraction
    rows.append((f"{args.frames}-frame {args.size}^2 turntable", t_ref, m_ref, t_fast, m_fast, "s"))
    print(rows[-1], flush=True)

    threshold = args.threshold
    _, t_grid_ref, m_grid_ref = timed(lambda: density_grid(released, planes, args.grid), 1)
    _, t_dense, m_dense = timed(lambda: density_grid(ours, planes, args.grid), args.repeats)
    _, t_grid_fast, m_grid_fast = timed(lambda: coarse_to_fine_grid(ours, planes, args.grid, threshold=threshold),
                                        args.repeats)
    print(f"{args.grid}^3 grid: released-style {t_grid_ref:.3f} s, "
          f"ours dense {t_dense:.3f} s (peak {m_dense:.2f} GiB), "
          f"ours coarse-to-fine {t_grid_fast:.3f} s", flush=True)
    rows.append((f"{args.grid}^3 density grid", t_grid_ref, m_grid_ref, t_grid_fast, m_grid_fast, "s"))
    # end to end, colours and the trimesh included: dense grid and PyMCubes as released; ours on the GPU
    mesh_ref, t_mesh_ref, m_ref = timed(lambda: extract_mesh(released, planes, args.grid, threshold, "dense",
                                                             surface="marching_cubes"), 1)
    mesh_fast, t_mesh_fast, m_fast = timed(lambda: extract_mesh(ours, planes, args.grid, threshold, "coarse_to_fine"),
                                           args.repeats)
    rows.append((f"{args.grid}^3 mesh, end to end", t_mesh_ref, m_ref, t_mesh_fast, m_fast, "s"))
    voxel = 2 / (args.grid - 1)
    vertices_ref = torch.as_tensor(mesh_ref.vertices, dtype=torch.float32, device=DEVICE)
    vertices_fast = torch.as_tensor(mesh_fast.vertices, dtype=torch.float32, device=DEVICE)
    mesh_gap = (nearest_vertex_distance(vertices_fast, vertices_ref).max().item() / voxel,
                nearest_vertex_distance(vertices_ref, vertices_fast).max().item() / voxel)

    print("| step | released-style | ours | speed-up | peak GiB released-style / ours |")
    print("| --- | --- | --- | --- | --- |")
    for name, t_ref, m_ref, t_fast, m_fast, unit in rows:
        scale = 1e3 if unit == "ms" else 1
        memory = "-" if m_ref is None else f"{m_ref:.1f} / {m_fast:.1f}"
        print(f"| {name} | {t_ref * scale:.{0 if unit == 'ms' else 2}f} {unit} | "
              f"{t_fast * scale:.{1 if unit == 'ms' else 2}f}"
              f" {unit} | {t_ref / t_fast:.1f}x | {memory} |")
    print(f"planes bf16 vs fp32: max |diff| {planes_error:.3g} (planes std {planes_std:.3g})")
    def gap(a, b):
        return f"mean |diff| {(a - b).abs().mean():.5f}, max {(a - b).abs().max():.4f}"

    print(f"turntable frames against ours fp32 without skipping: "
          f"ours bf16 with skipping {gap(frames_fast, frames_fp32)}; "
          f"ours bf16 without skipping {gap(frames_full, frames_fp32)}; released-style (same seed) "
          f"{gap(frames_ref, frames_fp32)}; ours fp32 with other sample jitter {gap(frames_noise, frames_fp32)}")
    print(f"occupancy: {occupied:.1%} of 128^3 cells; ours bf16 without skipping {t_full:.2f} s")
    print(f"mesh at density {threshold:.4g}: {len(vertices_ref)} vertices released-style (marching cubes), "
          f"{len(vertices_fast)} ours (surface nets); "
          f"farthest vertex from the other mesh: ours {mesh_gap[0]:.2f} voxel, "
          f"released-style {mesh_gap[1]:.2f} voxel")


if __name__ == "__main__":
    main()
