"""Isosurface extraction in plain PyTorch, on whatever device the grid lives on (naive surface nets).

`surface_nets` is the dual of marching cubes: one vertex per cell that the surface crosses, at the mean of
the surface's crossings of that cell's edges (the points marching cubes puts its vertices on), and one quad
(two triangles) per grid edge that the surface crosses, joining the vertices of the 4 cells around it.
Every step is a whole-grid tensor op (comparisons, `nonzero`, gathers), so a 512^3 grid takes milliseconds
on a GPU instead of PyMCubes' seconds on the CPU.

Conventions, shared with `mcubes.marching_cubes`: a value is inside when it is > threshold (a value equal to
the threshold is outside; the threshold is cast to the grid's dtype before comparing, as mcubes does) and
vertices are fractional grid indices (i, j, k). NaN is outside (NaN > threshold is False).

>>> vertices, faces = surface_nets(grid, threshold=1.0)  # grid (R, R, R) on cuda -> (V, 3), (F, 3) on cuda
"""

from __future__ import annotations

import math

import torch

# Cells per gather when placing vertices: bounds the (chunk, 12, 3) float temporaries to ~150 MB.
VERTEX_CHUNK = 2**20

# The 8 corners of a cell as (di, dj, dk) offsets, corner number = 4 di + 2 dj + dk, and its 12 edges as
# (low corner, high corner) pairs: 4 along each axis, the high corner one step further along that axis.
_CORNERS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)])
_EDGES = torch.tensor([(c, c | (4 >> axis)) for axis in range(3) for c in range(8) if not c & (4 >> axis)])


def _check_grid(grid: torch.Tensor, threshold: float) -> None:
    if not isinstance(grid, torch.Tensor):
        raise ValueError(f"grid must be a torch.Tensor, got {type(grid).__name__}")
    if grid.ndim != 3 or min(grid.shape) < 2:
        raise ValueError(f"grid must be 3-D with every side >= 2, got shape {tuple(grid.shape)}")
    if not grid.is_floating_point():
        raise ValueError(f"grid must have a floating dtype, got {grid.dtype}")
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold}")


def _interior_crossings(inside: torch.Tensor, axis: int) -> torch.Tensor:
    """Quads of the grid edges along `axis` whose ends differ in `inside` and which have 4 cells around them.

    inside: (R0, R1, R2) bool. -> quads (Q, 4) int64 flat cell indices into the (R0-1, R1-1, R2-1) cell grid,
    ordered so that the quad's right-hand normal points from the inside end of the edge to the outside end.
    """
    b, c = (axis + 1) % 3, (axis + 2) % 3  # (axis, b, c): a cyclic, so right-handed, order of the axes
    n = inside.shape
    lo = inside.narrow(axis, 0, n[axis] - 1).narrow(b, 1, n[b] - 2).narrow(c, 1, n[c] - 2)
    hi = inside.narrow(axis, 1, n[axis] - 1).narrow(b, 1, n[b] - 2).narrow(c, 1, n[c] - 2)
    crossed = lo != hi
    points = crossed.nonzero()  # (Q, 3): edge from grid point p to p + e_axis, p = this + e_b + e_c
    del crossed
    points[:, b] += 1
    points[:, c] += 1
    low_inside = inside[points[:, 0], points[:, 1], points[:, 2]]

    # The 4 cells around the edge are p - (0 or 1) e_b - (0 or 1) e_c. Going (-1,-1) -> (0,-1) -> (0,0) ->
    # (-1,0) in (b, c) turns counter-clockwise about e_b x e_c = e_axis, so the normal points along +e_axis:
    # outward when the low end is inside. Otherwise walk the other way round.
    steps = torch.tensor([[-1, -1], [0, -1], [0, 0], [-1, 0]], device=inside.device)
    steps = torch.where(low_inside[:, None, None], steps, steps[[0, 3, 2, 1]])  # (Q, 4, 2)
    cells = points[:, None, :].repeat(1, 4, 1)  # (Q, 4, 3)
    cells[..., b] += steps[..., 0]
    cells[..., c] += steps[..., 1]
    m1, m2 = n[1] - 1, n[2] - 1
    return (cells[..., 0] * m1 + cells[..., 1]) * m2 + cells[..., 2]


def _place_vertices(grid: torch.Tensor, threshold: float, cells: torch.Tensor) -> torch.Tensor:
    """Mean of the linear-interpolated threshold crossings on each cell's sign-changing edges.

    grid: (R0, R1, R2); cells: (M,) int64 flat indices into the (R0-1, R1-1, R2-1) cell grid, each crossed
    by the surface. -> (M, 3) float32 fractional grid indices.
    """
    _, n1, n2 = grid.shape
    flat = grid.reshape(-1)
    corners = _CORNERS.to(grid.device)
    corner_offsets = (corners[:, 0] * n1 + corners[:, 1]) * n2 + corners[:, 2]  # (8,)
    lo, hi = _EDGES[:, 0].to(grid.device), _EDGES[:, 1].to(grid.device)
    direction = (corners[hi] - corners[lo]).to(torch.float32)  # (12, 3) unit step along the edge's axis
    start = corners[lo].to(torch.float32)  # (12, 3)
    compute = torch.float64 if grid.dtype == torch.float64 else torch.float32
    out = []
    for part in cells.split(VERTEX_CHUNK):
        k = part % (n2 - 1)
        j = part // (n2 - 1) % (n1 - 1)
        i = part // ((n2 - 1) * (n1 - 1))
        index = torch.stack([i, j, k], dim=1)  # (m, 3)
        values = flat[((i * n1 + j) * n2 + k)[:, None] + corner_offsets].to(compute)  # (m, 8)
        inside = values > threshold
        crossed = inside[:, lo] != inside[:, hi]  # (m, 12)
        v0, v1 = values[:, lo], values[:, hi]
        # v0 != v1 on crossed edges; a NaN or infinite end can still make t NaN (-> midpoint) or out of [0, 1]
        t = ((threshold - v0) / (v1 - v0)).nan_to_num(0.5, posinf=1.0, neginf=0.0).clamp(0, 1).float()
        # elementwise rather than a matmul, which TF32 settings would round to 10 bits
        points = start + t[..., None] * direction  # (m, 12, 3) crossing points within the cell
        total = torch.where(crossed[..., None], points, 0.0).sum(dim=1)
        count = crossed.sum(dim=1, keepdim=True)  # >= 1: every cell given has a crossed edge
        out.append(index.float() + total / count)
    return torch.cat(out) if out else torch.empty(0, 3, device=grid.device)


@torch.no_grad()
def surface_nets(grid: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triangle mesh of the `threshold` level set of `grid`, by naive surface nets, on grid's device.

    grid: (R0, R1, R2) floating, every side >= 2; inside is grid > threshold, NaN is outside.
    -> vertices (V, 3) float32 in grid-index units (as `mcubes.marching_cubes`), faces (F, 3) int64, both on
    grid's device. Faces wind counter-clockwise seen from outside, i.e. normals point from high to low
    values (outward for a blob of high density), as marching cubes' do. Each crossed grid edge with 4 cells
    around it gives a quad, split along its shorter diagonal (the 0-2 one on near-ties). Vertices are the
    cells that some quad uses, so the mesh has no unused vertices; surfaces cut by the grid's boundary stay
    open, half a cell short of it.
    No surface gives (0, 3) and (0, 3) tensors.

    Memory beyond the grid and the output, for R^3 cells: at most the inside mask and one edge-crossing mask
    (bool, 2 R^3 bytes) or the vertex-id map (int32, 4 R^3 bytes) with the used-cell mask (bool, freed
    first), so under 5 R^3 bytes (0.7 GB at R = 512), plus index tensors that grow with the surface: about
    200 bytes per crossed edge while making quads, 32 per quad kept (int64 cell indices), and (chunk, 12, 3)
    floats while placing vertices. A half-precision grid is copied to float32 first.
    """
    _check_grid(grid, threshold)
    threshold = float(threshold)
    if grid.dtype not in (torch.float32, torch.float64):
        grid = grid.float()  # half precision: compare and interpolate in float32
    grid = grid.contiguous()
    device = grid.device
    inside = grid > threshold  # NaN > threshold is False: NaN is outside

    quads = torch.cat([_interior_crossings(inside, axis) for axis in range(3)])  # (Q, 4) flat cell indices
    del inside
    if len(quads) == 0:
        return torch.empty(0, 3, device=device), torch.empty(0, 3, dtype=torch.int64, device=device)

    # Compact vertex ids for the used cells: a dense bool mark, its nonzero() (ascending), and a dense id map
    # written only at those cells. int32 halves the map; a cumsum would also work but scans all R^3 cells.
    n_cells = math.prod(s - 1 for s in grid.shape)
    used = torch.zeros(n_cells, dtype=torch.bool, device=device)
    used[quads.reshape(-1)] = True
    cells = used.nonzero().squeeze(1)  # (V,) flat cell indices
    del used
    id_dtype = torch.int32 if n_cells < 2**31 else torch.int64
    ids = torch.empty(n_cells, dtype=id_dtype, device=device)  # only read where written
    ids[cells] = torch.arange(len(cells), dtype=id_dtype, device=device)
    quads = ids[quads].long()  # (Q, 4) vertex ids
    del ids

    vertices = _place_vertices(grid, threshold, cells)
    del cells
    # Split each quad along its shorter diagonal: fewer slivers and a closer fit to curved surfaces. Near-ties
    # (common on symmetric fields) go to 0-2, beyond rounding noise, so CPU and CUDA split alike.
    d02 = (vertices[quads[:, 0]] - vertices[quads[:, 2]]).square().sum(1)
    d13 = (vertices[quads[:, 1]] - vertices[quads[:, 3]]).square().sum(1)
    split02 = (d02 <= d13 * (1 + 1e-4))[:, None]
    first = torch.where(split02, quads[:, [0, 1, 2]], quads[:, [0, 1, 3]])
    second = torch.where(split02, quads[:, [0, 2, 3]], quads[:, [1, 2, 3]])
    faces = torch.stack([first, second], dim=1).reshape(-1, 3)  # a quad's two triangles side by side
    return vertices, faces


def nearest_vertex_distance(points: torch.Tensor, targets: torch.Tensor, within: float = math.inf,
                            chunk: int = 2048) -> torch.Tensor:
    """Distance from each of `points` (N, 3) to its nearest vertex of `targets` (M, 3), on points' device:
    (N,), exact where it is below `within`, else at least `within` (inf when no target comes that near).

    Compares two meshes' vertices (the nearest vertex of a mesh lies on its surface, so this bounds the
    distance to that surface). torch.cdist runs in chunks of points sorted by x, each against only the
    targets whose x lies within `within` of the chunk's: a nearer target cannot lie outside that slab.
    """
    order = points[:, 0].argsort()
    targets = targets[targets[:, 0].argsort()]
    target_x = targets[:, 0].contiguous()
    out = torch.empty(len(points), device=points.device, dtype=points.dtype)
    for index in order.split(chunk):
        part = points[index]
        bounds = torch.stack([part[:, 0].min() - within, part[:, 0].max() + within])
        lo, hi = torch.searchsorted(target_x, bounds.to(target_x.dtype)).tolist()
        near = targets[lo:hi]
        out[index] = torch.cdist(part, near).min(dim=1).values if len(near) else math.inf
    return out
