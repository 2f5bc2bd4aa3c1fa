"""Texture baking timings: decimate -> unwrap -> bake (field queries) -> dilate -> write GLB.

    python benchmarks/bake.py [--device cpu|cuda] [--grid 256] [--settings 100000:1024 20000:512] [--repeats 1]
                              [--unwrap per_face xatlas]

xatlas: unwrap, rasterise the charts, bake, dilate (on the CPU). per_face: layout and bake in one step on
`--device` (reported as bake), no dilation.

The mesh: a sphere of radius 0.5 written into the released-size network's decoder and planes
(`analytic.write_sphere`; random weights give fog with no surface), extracted on a `--grid`^3 grid (256: about
200k faces, as a 512 grid gives of a small object). Colours are queried from those planes through the released
decoder, so the bake step costs what it costs on a real triplane. Each `--settings` entry is max_faces:texture_size;
the table holds the median of `--repeats` runs of each step, in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vfusion3d_lightning.geometry.mesh import export_mesh, extract_mesh
from vfusion3d_lightning.geometry.texture import bake_texture, field_colour
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.analytic import write_sphere

STEPS = ("decimate", "unwrap", "bake", "dilate", "write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grid", type=int, default=256)
    parser.add_argument("--settings", nargs="+", default=["100000:1024", "30000:1024", "20000:512"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--unwrap", nargs="+", default=["per_face", "xatlas"], choices=["per_face", "xatlas"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("vfusion3d")).eval().to(args.device)
    planes = write_sphere(model, radius=0.5)
    start = time.perf_counter()
    mesh = extract_mesh(model, planes, args.grid, threshold=1.0, method="coarse_to_fine")
    print(f"mesh: {len(mesh.faces)} faces from a {args.grid}^3 grid in {time.perf_counter() - start:.1f} s "
          f"({args.device}, {torch.get_num_threads()} threads)")
    colour = field_colour(model, planes)
    print(f"{'unwrap':>8} {'max_faces':>9} {'texture':>7} {'faces':>7} " + " ".join(f"{s:>8}" for s in STEPS)
          + f" {'total':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for unwrap, setting in ((u, s) for u in args.unwrap for s in args.settings):
            max_faces, size = (int(v) for v in setting.split(":"))
            runs = []
            for _ in range(args.repeats):
                timings: dict[str, float] = {}
                textured = bake_texture(colour, mesh, size, max_faces, unwrap, args.device, timings=timings)
                clock = time.perf_counter()
                export_mesh(textured, Path(folder) / "mesh.glb")
                timings["write"] = time.perf_counter() - clock
                runs.append(timings)
            median = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STEPS}
            print(f"{unwrap:>8} {max_faces:>9} {size:>7} {len(textured.faces):>7} "
                  + " ".join(f"{median[s]:>8.2f}" for s in STEPS) + f" {sum(median.values()):>8.2f}")


if __name__ == "__main__":
    main()
