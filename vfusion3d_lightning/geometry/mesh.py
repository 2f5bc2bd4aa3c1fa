"""Coloured meshes from an LRM triplane: density grid -> isosurface -> per-vertex colours.

Follows the released VFusion3D inference: the activated density is sampled on a `resolution`^3 grid
over [-1, 1]^3 indexed [x, y, z], the `threshold` level set is extracted, vertices are mapped back to
[-1, 1] and coloured by querying the field there. The level set comes from `isosurface.surface_nets` on
the grid's device by default (milliseconds on a GPU; vertices within a voxel of marching cubes' surface),
or from `mcubes.marching_cubes` on the CPU as released (`surface="marching_cubes"`).
`coarse_to_fine_grid` gives the same surface while evaluating the field only near it.

>>> planes = model(image, canonical_source_camera(1))                  # (1, 3, C, H, W)
>>> mesh = extract_mesh(model, planes, resolution=256, method="coarse_to_fine")
>>> released = extract_mesh(model, planes, resolution=256, surface="marching_cubes")
>>> export_mesh(mesh, "out/object.glb")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vfusion3d_lightning.cameras import Y_UP_TO_WORLD
from vfusion3d_lightning.geometry.isosurface import surface_nets
from vfusion3d_lightning.io import atomic_write

MESH_FORMATS = (".glb", ".obj", ".ply")
METHODS = ("dense", "coarse_to_fine")
SURFACES = ("surface_nets", "marching_cubes")


class NoSurfaceError(ValueError):
    """The density grid holds no surface at the threshold asked for (its message suggests one that does)."""


def _check_planes(planes: torch.Tensor) -> None:
    if planes.ndim != 5 or planes.shape[0] != 1 or planes.shape[1] != 3:
        raise ValueError(f"planes must be one triplane (1, 3, C, H, W), got shape {tuple(planes.shape)}")


def _axis(resolution: int, device: torch.device) -> torch.Tensor:
    if resolution < 2:
        raise ValueError(f"grid resolution must be >= 2, got {resolution}")
    return torch.linspace(-1.0, 1.0, resolution, device=device)


def _query_density(model, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """points (M, 3) -> activated density (M,) float32."""
    density, _ = model.query(planes, points[None].to(planes.dtype))
    return density[0, :, 0].float()


def _slab_size(resolution: int, chunk: int) -> int:
    """Number of x-slices of a resolution^2 grid that fit in `chunk` points (at least one)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return max(1, chunk // (resolution * resolution))


@torch.no_grad()
def density_grid(model, planes: torch.Tensor, resolution: int = 512, chunk: int = 2**20) -> torch.Tensor:
    """Activated density on the grid linspace(-1, 1, R)^3.

    model: anything with `query(planes, points (1, M, 3)) -> (density (1, M, 1), rgb (1, M, 3))`, e.g. `LRM`;
    planes: (1, 3, C, H, W). -> (R, R, R) float32 on planes' device; grid[i, j, k] is the point (x_i, y_j, z_k).
    Queries about `chunk` points at a time (whole x-slices) so memory stays bounded.
    """
    _check_planes(planes)
    return _grid_at(model, planes, _axis(resolution, planes.device), chunk)


def _coarse_indices(resolution: int, coarse: int) -> torch.Tensor:
    """Fine-grid indices of the coarse nodes: every `stride`-th one, plus the last (the last cell may be shorter)."""
    if not 2 <= coarse <= resolution:
        raise ValueError(f"coarse resolution must be in [2, {resolution}], got {coarse}")
    stride = -(-(resolution - 1) // (coarse - 1))  # ceil
    idx = list(range(0, resolution - 1, stride)) + [resolution - 1]
    return torch.tensor(idx)


def _upsample_axis(values: torch.Tensor, idx: torch.Tensor, resolution: int, dim: int) -> torch.Tensor:
    """Linear interpolation along `dim` from nodes at fine indices `idx` (Rc,) to all R fine indices."""
    fine = torch.arange(resolution, device=values.device)
    idx = idx.to(values.device)
    cell = (torch.searchsorted(idx, fine, right=True) - 1).clamp(0, len(idx) - 2)  # (R,) coarse cell of each index
    t = ((fine - idx[cell]) / (idx[cell + 1] - idx[cell])).to(values.dtype)
    shape = [1] * values.ndim
    shape[dim] = resolution
    lo, hi = values.index_select(dim, cell), values.index_select(dim, cell + 1)
    return torch.lerp(lo, hi, t.reshape(shape))


@torch.no_grad()
def coarse_to_fine_grid(
    model,
    planes: torch.Tensor,
    resolution: int = 512,
    coarse: int | None = None,
    threshold: float = 1.0,
    margin: float | None = None,
    chunk: int = 2**20,
    progress=None,
) -> tuple[torch.Tensor, float]:
    """`density_grid` values wherever they decide the `threshold` surface, evaluating far fewer points.

    A coarse grid of about `coarse` (default (R-1)//4 + 1) nodes per axis, placed on fine-grid points, is
    evaluated first. Coarse cells whose 8 corners straddle `threshold` or come within `margin` (default
    0.25 * threshold) of it, dilated by one cell, are evaluated at every fine point (cell faces included).
    Every other fine point gets the trilinear upsampling of the coarse grid: its cell's corners all lie on
    one side, beyond the margin, so the value does too. Marching cubes therefore gives exactly the dense
    surface wherever the field has no features smaller than a coarse cell.

    planes: (1, 3, C, H, W) -> grid (R, R, R) float32 on planes' device, and the fraction of the R^3 fine
    points evaluated (coarse nodes included).
    """
    _check_planes(planes)
    xs = _axis(resolution, planes.device)
    coarse = (resolution - 1) // 4 + 1 if coarse is None else coarse
    margin = 0.25 * abs(threshold) if margin is None else margin
    idx = _coarse_indices(resolution, coarse)
    n_coarse = len(idx)
    # coarse nodes are fine points, so their values agree exactly with the dense grid
    coarse_grid = _grid_at(model, planes, xs[idx.to(xs.device)], chunk, progress)  # (Rc, Rc, Rc)

    # max and min over each coarse cell's 8 corners: (Rc-1, Rc-1, Rc-1)
    high = F.max_pool3d(coarse_grid[None, None], 2, 1)[0, 0]
    low = -F.max_pool3d(-coarse_grid[None, None], 2, 1)[0, 0]
    active = (low <= threshold + margin) & (high >= threshold - margin)
    # one more cell each way catches surfaces that clip a cell without changing its corners' side
    active = F.max_pool3d(active[None, None].float(), 3, 1, padding=1)[0, 0]

    # Interleave nodes (even positions) and cells (odd positions); a node or face/edge point is evaluated
    # when any cell containing it is active, which a 3-wide max pool over the interleaved array gives.
    interleaved = torch.zeros((2 * n_coarse - 1,) * 3, device=planes.device)
    interleaved[1::2, 1::2, 1::2] = active
    needed = F.max_pool3d(interleaved[None, None], 3, 1, padding=1)[0, 0] > 0
    # position of each fine index in the interleaved array: 2c on node c, 2c+1 strictly inside cell c
    fine = torch.arange(resolution)
    cell = (torch.searchsorted(idx, fine, right=True) - 1).clamp(0, n_coarse - 2)
    position = torch.where(fine == idx[cell], 2 * cell, 2 * cell + 1)
    position = torch.where(fine == resolution - 1, torch.tensor(2 * n_coarse - 2), position).to(planes.device)

    grid = coarse_grid
    for dim in range(3):
        grid = _upsample_axis(grid, idx, resolution, dim)
    grid = grid.contiguous()

    evaluated = 0
    step = _slab_size(resolution, chunk)
    needed_yz = needed[:, position][:, :, position]  # (2Rc-1, R, R)
    for start in range(0, resolution, step):
        mask = needed_yz[position[start: start + step]]  # (s, R, R)
        if progress is not None:
            progress.update(len(mask))
        where = mask.nonzero()
        if len(where) == 0:
            continue
        points = torch.stack([xs[where[:, 0] + start], xs[where[:, 1]], xs[where[:, 2]]], dim=1)
        values = torch.cat([_query_density(model, planes, part) for part in points.split(chunk)])
        grid[start: start + len(mask)][mask] = values  # nonzero() order is row-major, as boolean indexing
        evaluated += len(where)
    fraction = (evaluated + n_coarse**3) / resolution**3
    return grid, fraction


def _grid_at(model, planes: torch.Tensor, axis: torch.Tensor, chunk: int, progress=None) -> torch.Tensor:
    """Density at the tensor-product grid axis^3 (same axis for x, y, z) -> (n, n, n) float32.
    progress: a tqdm bar, advanced by one per x-slice."""
    n = len(axis)
    yz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    out = torch.empty((n,) * 3, dtype=torch.float32, device=planes.device)
    step = _slab_size(n, chunk)
    for start in range(0, n, step):
        x = axis[start: start + step]
        points = torch.cat([x.repeat_interleave(len(yz))[:, None], yz.repeat(len(x), 1)], dim=1)
        out[start: start + len(x)] = _query_density(model, planes, points).reshape(len(x), n, n)
        if progress is not None:
            progress.update(len(x))
    return out


def suggest_threshold(grid: torch.Tensor, quantile: float = 0.95) -> float:
    """A density level with a surface in most fields: the `quantile` of the grid's values (on a strided sample
    of at most ~2M of them, as torch.quantile takes at most 2**24)."""
    values = grid.flatten().float()
    values = values[:: max(1, len(values) // 2**21)]
    return float(torch.quantile(values, quantile))


@torch.no_grad()
def extract_mesh(
    model,
    planes: torch.Tensor,
    resolution: int = 512,
    threshold: float = 1.0,
    method: str = "dense",
    chunk: int = 2**20,
    surface: str = "surface_nets",
    progress: bool = False,
    vertex_colours: bool = True,
):
    """Mesh of the `threshold` density level set (density > threshold is inside), with per-vertex colours.

    planes: (1, 3, C, H, W). Vertices (V, 3) are x, y, z in [-1, 1] (grid index i -> i / (R-1) * 2 - 1);
    faces (F, 3) as the surface extractor returns them, wound so normals point out of the object; vertex
    colours (V, 4) uint8 RGBA from the field's rgb at the vertices, clamped to [0, 1] and scaled by 255 with
    truncation, as released.
    method: "dense" (`density_grid`) or "coarse_to_fine" (`coarse_to_fine_grid`, same surface, faster).
    surface: "surface_nets" (`isosurface.surface_nets` on planes' device) or "marching_cubes" (PyMCubes on
    the CPU, as released).
    progress: show a tqdm bar (x-slices of the grid, with an ETA) on stderr.
    vertex_colours: False skips the colour queries (a mesh about to be textured needs none).
    Raises NoSurfaceError (a ValueError) when the grid holds no surface at `threshold`, suggesting one that has
    (`suggest_threshold`).
    """
    import trimesh
    from tqdm import tqdm

    if method not in METHODS:
        raise ValueError(f"unknown mesh extraction method {method!r}; choose one of {list(METHODS)}")
    if surface not in SURFACES:
        raise ValueError(f"unknown isosurface extractor {surface!r}; choose one of {list(SURFACES)}")
    _check_planes(planes)
    slices = resolution + (0 if method == "dense" else len(_coarse_indices(resolution, (resolution - 1) // 4 + 1)))
    with tqdm(total=slices, desc="mesh", unit="slice", disable=not progress, leave=False) as bar:
        if method == "dense":
            grid = _grid_at(model, planes, _axis(resolution, planes.device), chunk, bar)
        else:
            grid, _ = coarse_to_fine_grid(model, planes, resolution, threshold=threshold, chunk=chunk, progress=bar)
    if surface == "surface_nets":
        vertices, faces = surface_nets(grid, threshold)
        vertices = vertices / (resolution - 1) * 2 - 1  # float32, on the grid's device
        faces = faces.cpu().numpy()
    else:
        import mcubes  # optional: only the released path needs it

        vertices, faces = mcubes.marching_cubes(grid.cpu().numpy(), threshold)
        vertices = torch.from_numpy(vertices / (resolution - 1) * 2 - 1)  # float64 on the CPU, as released
    if len(vertices) == 0 or len(faces) == 0:
        raise NoSurfaceError(
            f"no surface at density threshold {threshold}: the density grid ranges over "
            f"[{grid.min().item():.4g}, {grid.max().item():.4g}]; pick a threshold inside that range, e.g. "
            f"{suggest_threshold(grid):.4g} (its 95th percentile)"
        )
    if not vertex_colours:
        return trimesh.Trimesh(vertices=vertices.cpu().numpy(), faces=faces, process=False)
    points = vertices.to(planes.device, torch.float32)
    rgb = torch.cat([model.query(planes, part[None].to(planes.dtype))[1][0].float() for part in points.split(chunk)])
    rgb = (rgb.clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    colours = np.concatenate([rgb, np.full((len(rgb), 1), 255, dtype=np.uint8)], axis=1)
    # process=False keeps vertices and faces exactly as the extractor made them
    return trimesh.Trimesh(vertices=vertices.cpu().numpy(), faces=faces, vertex_colors=colours, process=False)


def export_mesh(mesh, path: str | Path) -> Path:
    """Write `mesh` (in the +z-up world) as a +y-up .glb, .obj or .ply (by suffix), as glTF's specification and
    viewers have it and `render` reads by default; each file atomically (see `io.atomic_write`). A textured
    mesh (`texture.bake_texture`) goes to .glb with its texture inside, or to .obj beside a .mtl and the .png
    they name (written first, so the .obj never points at a missing file); .ply keeps only vertex colours.
    Returns the mesh file's path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_FORMATS:
        raise ValueError(f"unsupported mesh format {path.suffix!r} for {path}; use one of {list(MESH_FORMATS)}")
    # the cache holds the normals `bake_texture` set; apply_transform rotates them too
    mesh = mesh.copy(include_cache=True).apply_transform(Y_UP_TO_WORLD.T)  # world +z -> file +y; camera side -> front
    if suffix == ".obj":
        from trimesh.exchange.obj import export_obj
        from trimesh.visual.material import PBRMaterial, SimpleMaterial

        material = getattr(mesh.visual, "material", None)
        if isinstance(material, PBRMaterial) and material.baseColorTexture is not None:
            # trimesh would write Kd 0.4, which viewers multiply the texture by: white keeps its colours
            mesh.visual.material = SimpleMaterial(image=material.baseColorTexture, diffuse=(255, 255, 255, 255),
                                                  ambient=(255, 255, 255, 255), specular=(0, 0, 0, 255),
                                                  name=path.stem)
        text, files = export_obj(mesh, include_texture=True, return_texture=True, mtl_name=f"{path.stem}.mtl")
        for name, data in sorted(files.items(), key=lambda item: item[0].endswith(".mtl")):  # texture, then .mtl
            atomic_write(path.parent / name, lambda tmp, data=data: tmp.write_bytes(data))
        return atomic_write(path, lambda tmp: tmp.write_text(text))
    return atomic_write(path, lambda tmp: mesh.export(str(tmp), file_type=suffix[1:]))
