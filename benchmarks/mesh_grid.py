"""Meshing a density grid: dense (as released) vs coarse-to-fine grids, then PyMCubes (CPU, as released) vs
surface nets (on --device), on a released-size decoder.

    python benchmarks/mesh_grid.py --resolutions 128 256 [--device cuda]

The field is a sphere of radius 0.5 written into 80-channel 256^2 planes and a 240 -> 64 -> 64 -> 64 -> 4
decoder by hand, so both paths have a real surface to find; the script checks the two grids give the same
marching-cubes mesh. The second table times the isosurface step alone on the dense grid (already on
--device) and gives the largest distance, in voxels, from any vertex of either mesh to the other's nearest
vertex (an upper bound on the distance to the other's surface), and on CUDA the peak memory allocated
during surface nets (grid included).
"""

from __future__ import annotations

import argparse
import platform
import time

import mcubes
import numpy as np
import torch

from vfusion3d_lightning.geometry.isosurface import nearest_vertex_distance, surface_nets
from vfusion3d_lightning.geometry.mesh import coarse_to_fine_grid, density_grid
from vfusion3d_lightning.models.lrm.analytic import write_radius_squared
from vfusion3d_lightning.models.lrm.renderer import TriplaneDecoder, density_activation, sample_triplane


class SphereField:
    """A released-size decoder and planes whose activated density is 1 on |p| = 0.5."""

    def __init__(self, device: str, channels: int = 80, size: int = 256):
        torch.manual_seed(0)
        self.decoder = TriplaneDecoder(3 * channels, 64, 4).eval()
        planes = torch.randn(1, 3, channels, size, size) * 0.01
        with torch.no_grad():
            for layer in self.decoder.layers:
                layer.weight.mul_(0.01)
            write_radius_squared(planes, self.decoder, radius=0.5, steepness=20.0)
        self.decoder.to(device)
        self.planes = planes.to(device)

    def query(self, planes: torch.Tensor, points: torch.Tensor):
        raw_sigma, rgb = self.decoder(sample_triplane(planes, points))
        return density_activation(raw_sigma), rgb


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    field = SphereField(args.device)
    cuda = torch.device(args.device).type == "cuda"
    name = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU"
    print(f"# {name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| grid | dense | coarse-to-fine | speed-up | points evaluated | marching cubes (CPU) | same mesh |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    surfaces = []
    for resolution in args.resolutions:
        density_grid(field, field.planes, 32)  # warm-up
        dense, t_dense = timed(lambda: density_grid(field, field.planes, resolution))
        (fine, fraction), t_fine = timed(lambda: coarse_to_fine_grid(field, field.planes, resolution))
        (vertices, faces), t_mc = timed(lambda: mcubes.marching_cubes(dense.cpu().numpy(), 1.0))
        fine_vertices, fine_faces = mcubes.marching_cubes(fine.cpu().numpy(), 1.0)
        same = np.array_equal(faces, fine_faces) and np.allclose(vertices, fine_vertices)
        print(f"| {resolution}^3 | {t_dense:.2f} s | {t_fine:.2f} s | {t_dense / t_fine:.1f}x | {fraction:.1%} "
              f"| {t_mc:.2f} s | {same} |")

        del fine
        surface_nets(dense[::8, ::8, ::8].contiguous(), 1.0)  # warm-up on a coarse copy, surface included
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        (nets_vertices, nets_faces), t_nets = timed(lambda: surface_nets(dense, 1.0))
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "-"
        mc_vertices = torch.as_tensor(vertices, dtype=torch.float32, device=nets_vertices.device)
        # exact up to 2 voxels, which is all the table needs to show
        distance = max(nearest_vertex_distance(nets_vertices, mc_vertices, within=2).max().item(),
                       nearest_vertex_distance(mc_vertices, nets_vertices, within=2).max().item())
        surfaces.append(f"| {resolution}^3 | {t_mc:.3f} s | {t_nets:.3f} s | {t_mc / t_nets:.1f}x "
                        f"| {len(vertices)} / {len(faces)} | {len(nets_vertices)} / {len(nets_faces)} "
                        f"| {distance:.3f} | {peak} |")
    print(f"\n# isosurface of the dense grid: PyMCubes on the CPU vs surface nets on {args.device}")
    print("| grid | marching cubes | surface nets | speed-up | mc vertices / faces | nets vertices / faces "
          "| max vertex distance (voxels) | peak CUDA memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(surfaces))


if __name__ == "__main__":
    main()
