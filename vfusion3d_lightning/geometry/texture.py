"""UV-textured meshes: decimate -> unwrap -> bake the triplane's colour into a base-colour texture.

Two unwraps (`UNWRAPS`):
- "per_face" (milliseconds, on the mesh's device): faces 2k and 2k+1 fill the k-th square cell of a grid over the
  texture, each a right triangle in its half. Every texel of a cell belongs to one of its two faces and gets the
  colour of the nearest point of that face, so bilinear lookups inside a face never read another face's texels
  (the layout above `MIN_CELL`). Mip-maps of a distant view do blend neighbouring cells.
- "xatlas" (seconds: 4 s for 30k faces on a Xeon, BENCHMARKS.md): charts of connected faces. Every texel inside
  a chart gets the colour of its 3D surface point: the texel centre is rasterised in UV space (all triangles at
  once, vectorised), its barycentric coordinates place it on the triangle in 3D, and the field is queried there
  in batches. Texels outside the charts take the mean of their filled neighbours for `DILATE_ITERATIONS` rounds,
  then the charts' mean colour, so bilinear filtering and mip-maps show no seams.
Both give the vertices the smooth normals of the decimated mesh, which a face's own vertices would not.

UV convention (trimesh's and OpenGL's): u to the right, v up; image row 0 is the top, so texel (row r,
column c) has its centre at u = (c + 0.5) / size, v = 1 - (r + 0.5) / size.

>>> colour = field_colour(model, planes)                     # points (M, 3) -> rgb (M, 3) in [0, 1]
>>> textured = bake_texture(colour, mesh, size=1024)         # a trimesh.Trimesh with a PBR base-colour texture
>>> export_mesh(textured, "out/mesh.glb")                    # or .obj (+ .mtl + .png)
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MAX_FACES = 30_000  # xatlas grows faster than the face count: 100k faces took 17 s (BENCHMARKS.md)
UNWRAPS = ("per_face", "xatlas")
# A per-face cell of c texels, pixel coordinates (x right, y down, texel i's centre at i + 0.5): face 0 at
# (1, 1), (c - 2, 1), (1, c - 2), face 1 at (c - 1, c - 1), (3, c - 1), (c - 1, 3); texels whose centres sum to
# <= c belong to face 0, the others to face 1. A bilinear lookup reads texels less than one texel away on each
# axis, so from inside face 0 (x + y <= c - 1) only centre sums <= c, from face 1 (x + y >= c + 2) only >= c + 1,
# and from either never outside the cell.
MIN_CELL = 5  # face 1's legs are c - 4 texels
DILATE_ITERATIONS = 16  # texels of bleed beyond each chart; xatlas leaves PADDING between charts
PADDING = 4
QUERY_CHUNK = 2**18

ColourFn = Callable[[torch.Tensor], torch.Tensor]


def field_colour(model, planes: torch.Tensor, chunk: int = QUERY_CHUNK) -> ColourFn:
    """points (M, 3) in the box -> the triplane's rgb (M, 3) float32 in [0, 1] on the points' device, `chunk`
    points a call."""

    @torch.no_grad()
    def colour(points: torch.Tensor) -> torch.Tensor:
        points = torch.as_tensor(points, dtype=torch.float32)
        parts = [model.query(planes, part[None].to(planes.device, planes.dtype))[1][0].float().clamp(0, 1)
                 for part in points.split(chunk)]
        return torch.cat(parts).to(points.device) if parts else torch.zeros(0, 3, device=points.device)

    return colour


def decimate(vertices: torch.Tensor, faces: torch.Tensor, max_faces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex clustering down to at most `max_faces` faces, on the tensors' device: vertices in one cubic cell
    merge to their mean; faces that collapse or repeat are dropped (winding and order kept). A mesh already small
    enough is returned as is. The cell starts at the size that would leave about `max_faces` faces on a smooth
    surface and grows by 25% until the count fits. vertices (V, 3) float, faces (F, 3) int64 (arrays are taken
    as CPU tensors)."""
    if max_faces < 4:
        raise ValueError(f"max_faces must be >= 4, got {max_faces}")
    vertices = torch.as_tensor(vertices)
    faces = torch.as_tensor(faces, dtype=torch.int64, device=vertices.device)
    if len(faces) <= max_faces:
        return vertices, faces
    low = vertices.min(0).values
    edges = (vertices[faces[:, 0]] - vertices[faces[:, 1]]).norm(dim=1)
    cell = edges.mean().item() * math.sqrt(len(faces) / max_faces)
    order = torch.arange(len(faces), device=faces.device)
    while True:
        keys = ((vertices - low) / cell).floor().long()
        span = int(keys.max()) + 1
        _, cluster, counts = torch.unique((keys[:, 0] * span + keys[:, 1]) * span + keys[:, 2], return_inverse=True,
                                          return_counts=True)  # cells in x, y, z order
        merged = torch.zeros(len(counts), 3, dtype=vertices.dtype, device=vertices.device)
        merged = merged.index_add_(0, cluster, vertices) / counts[:, None].to(vertices.dtype)
        new = cluster[faces]
        new = new[(new[:, 0] != new[:, 1]) & (new[:, 1] != new[:, 2]) & (new[:, 0] != new[:, 2])]
        corners = new.sort(1).values
        if len(counts) < 2**21:  # three indices fit one int64
            _, repeat = torch.unique((corners[:, 0] << 42) | (corners[:, 1] << 21) | corners[:, 2],
                                     return_inverse=True)
        else:
            _, repeat = torch.unique(corners, dim=0, return_inverse=True)
        first = torch.full((int(repeat.max()) + 1 if len(repeat) else 0,), len(new), device=new.device)
        first = first.scatter_reduce_(0, repeat, order[:len(new)], "amin")
        new = new[first.sort().values]
        if len(new) <= max_faces:
            used, remap = torch.unique(new, return_inverse=True)
            return merged[used], remap.view(-1, 3)
        cell *= 1.25


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted mean of the faces' normals at each vertex, unit length -> (V, 3)."""
    corners = vertices[faces]
    weighted = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # |.| = 2 area
    normals = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), weighted.repeat_interleave(3, 0))
    return normals / normals.norm(dim=1, keepdim=True).clamp(min=1e-12)


def check_unwrap(unwrap: str) -> None:
    if unwrap not in UNWRAPS:
        raise ValueError(f"unknown unwrap {unwrap!r}; choose one of {list(UNWRAPS)}")


def face_capacity(size: int) -> int:
    """The most faces the per-face unwrap fits in a `size`^2 texture."""
    return 2 * (size // MIN_CELL) ** 2


def face_atlas(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The per-face unwrap's layout for `count` faces in a `size`^2 texture (the cell layout above `MIN_CELL`).
    -> corners (count, 3, 2) float64 pixel coordinates of each face's UV triangle, the two triangles of a cell
    (2, 3, 2) in its own pixel coordinates, the cell size in texels and cells a row."""
    cells = max(1, -(-count // 2))
    per_row = math.ceil(math.sqrt(cells))
    cell = size // per_row
    if cell < MIN_CELL:
        raise ValueError(f"a {size}^2 texture holds at most {face_capacity(size)} faces in the per-face unwrap, and "
                         f"the mesh has {count}: raise the texture size, lower max_faces, or unwrap with xatlas")
    c = float(cell)
    slots = torch.tensor([[[1, 1], [c - 2, 1], [1, c - 2]], [[c - 1, c - 1], [3, c - 1], [c - 1, 3]]],
                         dtype=torch.float64)
    index = torch.arange(count)
    origin = torch.stack([index // 2 % per_row, index // 2 // per_row], 1).double() * cell  # (x, y) of the cell
    return origin[:, None] + slots[index % 2], slots, cell, per_row


def bake_per_face(colour: ColourFn, vertices: torch.Tensor, faces: torch.Tensor, size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-face unwrap and bake (module docstring). -> vertices (3F, 3) (each face its own three), uv (3F, 2)
    and the texture (size, size, 3) in [0, 1], on the vertices' device."""
    device = vertices.device
    corners, slots, cell, per_row = face_atlas(len(faces), size)
    # each texel of a cell: which of its two faces, and its barycentric coordinates on that face, clamped onto it
    x, y = torch.meshgrid(torch.arange(cell) + 0.5, torch.arange(cell) + 0.5, indexing="xy")
    slot = (x + y > cell).long()  # (cell, cell), rows y
    a, b, c = slots.unbind(1)
    pixel = torch.stack([x, y], -1).double()[None]  # (1, cell, cell, 2)

    def cross(u, v):
        return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]

    area = cross(b - a, c - a)[:, None, None]
    w1 = cross(pixel - a[:, None, None], c[:, None, None] - a[:, None, None]) / area
    w2 = cross(b[:, None, None] - a[:, None, None], pixel - a[:, None, None]) / area
    weights = torch.stack([1 - w1 - w2, w1, w2], -1).clamp(min=0)
    weights = weights / weights.sum(-1, keepdim=True)  # (2, cell, cell, 3)
    weights = torch.where(slot[..., None] == 0, weights[0], weights[1]).to(device, vertices.dtype)
    cells = -(-len(faces) // 2)
    tri = vertices[torch.cat([faces, faces[-1:].expand(2 * cells - len(faces), 3)])]  # an odd count: pad a face
    tri = tri.view(cells, 2, 3, 3)[:, slot.to(device)]  # (cells, cell, cell, 3 corners, 3)
    points = torch.einsum("yxk,nyxkd->nyxd", weights, tri)
    rgb = colour(points.reshape(-1, 3).float()).to(device).view(cells, cell, cell, 3)
    rows = -(-cells // per_row)
    fill = rgb.reshape(-1, 3).mean(0)
    grid = torch.cat([rgb, fill.expand(rows * per_row - cells, cell, cell, 3)])
    grid = grid.view(rows, per_row, cell, cell, 3).permute(0, 2, 1, 3, 4).reshape(rows * cell, per_row * cell, 3)
    image = fill.expand(size, size, 3).clone()
    image[:len(grid), :grid.shape[1]] = grid
    uv = corners.reshape(-1, 2).to(device) / size
    uv[:, 1] = 1 - uv[:, 1]  # pixel y counts rows down; v goes up
    return vertices[faces.reshape(-1)], uv, image


def unwrap_xatlas(vertices: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts packed into a `size`^2 texture with `PADDING` texels between charts.
    -> vmapping (V',) original vertex of each new vertex, faces (F, 3) into the new vertices, uv (V', 2) in [0, 1]
    (v up, see the module docstring)."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = size, PADDING, True
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, indices, uvs = atlas[0]
    uvs = uvs.astype(np.float64)
    uvs[:, 1] = 1 - uvs[:, 1]  # xatlas counts rows down from the top; trimesh's v goes up
    return vmapping.astype(np.int64), indices.astype(np.int64), uvs


def rasterise(uv: np.ndarray, faces: np.ndarray, size: int, chunk: int = 2**22) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre, and where. -> face (size, size) int64 (-1: none) and
    barycentric coordinates (size, size, 3) float32. Every triangle's bounding-box texels are tested at once
    (`chunk` candidate texels per step bounds the memory); where triangles overlap the later one wins."""
    pixel = np.stack([uv[:, 0] * size - 0.5, (1 - uv[:, 1]) * size - 0.5], axis=1)  # (column, row) of texel centres
    corners = pixel[faces]  # (F, 3, 2)
    lo = np.clip(np.ceil(corners.min(1)), 0, size - 1).astype(np.int64)
    hi = np.clip(np.floor(corners.max(1)), 0, size - 1).astype(np.int64)
    extent = np.maximum(hi - lo + 1, 0)
    extent[(corners.max(1) < 0).any(1) | (corners.min(1) > size - 1).any(1)] = 0
    area = extent[:, 0] * extent[:, 1]
    face_of = np.full((size, size), -1, np.int64)
    bary_of = np.zeros((size, size, 3), np.float32)
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    det = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    ends = np.cumsum(area)
    start = 0
    while start < len(faces):
        # the triangles whose candidates fit in this step (at least one)
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + chunk, "right")))
        ids = np.arange(start, stop)
        ids = ids[(area[ids] > 0) & (np.abs(det[ids]) > 1e-12)]
        start = stop
        if len(ids) == 0:
            continue
        tri = np.repeat(ids, area[ids])
        offsets = np.arange(len(tri)) - np.repeat(np.cumsum(area[ids]) - area[ids], area[ids])
        col = lo[tri, 0] + offsets % extent[tri, 0]
        row = lo[tri, 1] + offsets // extent[tri, 0]
        ta, tb, tc, d = a[tri], b[tri], c[tri], det[tri]
        w1 = ((col - ta[:, 0]) * (tc[:, 1] - ta[:, 1]) - (tc[:, 0] - ta[:, 0]) * (row - ta[:, 1])) / d
        w2 = ((tb[:, 0] - ta[:, 0]) * (row - ta[:, 1]) - (col - ta[:, 0]) * (tb[:, 1] - ta[:, 1])) / d
        w0 = 1 - w1 - w2
        inside = (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6)
        face_of[row[inside], col[inside]] = tri[inside]
        bary_of[row[inside], col[inside]] = np.stack([w0, w1, w2], 1)[inside]
    return face_of, bary_of


def dilate(image: torch.Tensor, mask: torch.Tensor, iterations: int = DILATE_ITERATIONS) -> torch.Tensor:
    """image (H, W, 3) valid where mask (H, W): each round, every empty texel next to filled ones (8-neighbours)
    takes their mean; after `iterations` rounds the still-empty ones take the mean of the valid texels."""
    mean = image[mask].mean(0) if mask.any() else torch.full((3,), 0.5)
    weight = mask[None].float()  # (1, H, W)
    image = image.permute(2, 0, 1) * weight  # (3, H, W), zero where empty
    for _ in range(iterations):
        # 3x3 sums as avg_pool * 9 (count_include_pad: the border counts zeros): several times faster than conv2d
        total, count = F.avg_pool2d(image, 3, 1, padding=1), F.avg_pool2d(weight, 3, 1, padding=1)
        grow = (weight == 0) & (count > 0)
        if not grow.any():
            break
        image = torch.where(grow, total / count.clamp(min=1e-6), image)
        weight = weight + grow.float()
    image = torch.where(weight > 0, image, mean.view(3, 1, 1))
    return image.permute(1, 2, 0)


def bake_texture(colour: ColourFn, mesh, size: int = 1024, max_faces: int = DEFAULT_MAX_FACES,
                 unwrap: str = "per_face", device: str | torch.device = "cpu", timings: dict | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = False):
    """`mesh` (trimesh.Trimesh) -> a new trimesh.Trimesh, decimated to at most `max_faces` faces, with UVs, smooth
    vertex normals and a `size`^2 base-colour texture (PBR material) baked from `colour` (see `field_colour`).
    `unwrap`: one of `UNWRAPS` (module docstring); the per-face one decimates further where the texture holds
    fewer faces (`face_capacity`). `device`: where decimation and the per-face bake run.
    `timings`: filled with the seconds of each step (decimate, bake, and unwrap and dilate for xatlas); `log`: called
    with one line saying how far the mesh was decimated; `progress`: a tqdm bar of the steps on stderr."""
    import trimesh
    from PIL import Image
    from tqdm import tqdm

    if size < 8:
        raise ValueError(f"texture size must be >= 8 texels, got {size}")
    check_unwrap(unwrap)
    timings = {} if timings is None else timings
    device = torch.device(device)
    bar = tqdm(total=4 if unwrap == "xatlas" else 3, desc="texture", unit="step", disable=not progress, leave=False)
    clock = time.perf_counter()

    def done(step: str) -> None:
        nonlocal clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[step], clock = time.perf_counter() - clock, time.perf_counter()
        bar.update()

    with bar:
        budget = max_faces if unwrap == "xatlas" else min(max_faces, face_capacity(size))
        vertices, faces = decimate(torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device),
                                   torch.as_tensor(mesh.faces, dtype=torch.int64, device=device), budget)
        if log is not None and len(faces) < len(mesh.faces):
            why = "" if budget == max_faces else f"; a {size}^2 texture holds {budget} in the per-face unwrap"
            log(f"decimated {len(mesh.faces)} -> {len(faces)} faces (--max_faces {max_faces}{why})")
        normals = vertex_normals(vertices, faces)
        done("decimate")
        if unwrap == "per_face":
            vertices, uv, image = bake_per_face(colour, vertices, faces, size)
            normals = normals[faces.reshape(-1)]
            faces = torch.arange(len(vertices)).view(-1, 3)
            done("bake")  # its layout is part of the bake
        else:
            vertices, faces = vertices.cpu().double().numpy(), faces.cpu().numpy()
            vmapping, faces, uv = unwrap_xatlas(vertices, faces, size)
            vertices, normals = vertices[vmapping], normals[torch.from_numpy(vmapping).to(device)]
            done("unwrap")
            face_of, bary = rasterise(uv, faces, size)
            mask = face_of >= 0
            points = np.einsum("nk,nkd->nd", bary[mask], vertices[faces[face_of[mask]]])
            image = torch.zeros(size, size, 3)
            image[torch.from_numpy(mask)] = colour(torch.from_numpy(points).float()).cpu()
            done("bake")
            image = dilate(image, torch.from_numpy(mask))
            done("dilate")
        texture = Image.fromarray((image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy())
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture, metallicFactor=0.0,
                                                   roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=torch.as_tensor(uv).cpu().numpy(), material=material)
    return trimesh.Trimesh(vertices=torch.as_tensor(vertices).cpu().numpy(), faces=torch.as_tensor(faces).numpy(),
                           vertex_normals=normals.cpu().numpy(), visual=visual, process=False)


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of image (H, W, C) at uv (N, 2) in the module's convention, edges clamped -> (N, C) float."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    image = image.astype(np.float64)
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy
