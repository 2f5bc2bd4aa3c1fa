"""UV-textured meshes: decimate -> unwrap (xatlas) -> bake the triplane's colour into a base-colour texture.

Every texel inside a chart gets the colour of its 3D surface point: the texel centre is rasterised in UV space
(all triangles at once, vectorised), its barycentric coordinates place it on the triangle in 3D, and the field
is queried there in batches. Texels outside the charts take the mean of their filled neighbours for
`DILATE_ITERATIONS` rounds, then the charts' mean colour, so bilinear filtering and mip-maps show no seams.

UV convention (trimesh's and OpenGL's): u to the right, v up; image row 0 is the top, so texel (row r,
column c) has its centre at u = (c + 0.5) / size, v = 1 - (r + 0.5) / size.

>>> colour = field_colour(model, planes)                     # points (M, 3) -> rgb (M, 3) in [0, 1]
>>> textured = bake_texture(colour, mesh, size=1024)         # a trimesh.Trimesh with a PBR base-colour texture
>>> export_mesh(textured, "out/mesh.glb")                    # or .obj (+ .mtl + .png)
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MAX_FACES = 30_000  # xatlas grows faster than the face count: 100k faces took 17 s (BENCHMARKS.md)
DILATE_ITERATIONS = 16  # texels of bleed beyond each chart; xatlas leaves PADDING between charts
PADDING = 4
QUERY_CHUNK = 2**18

ColourFn = Callable[[torch.Tensor], torch.Tensor]


def field_colour(model, planes: torch.Tensor, chunk: int = QUERY_CHUNK) -> ColourFn:
    """points (M, 3) in the box -> the triplane's rgb (M, 3) float32 in [0, 1] on the CPU, `chunk` points a call."""

    @torch.no_grad()
    def colour(points: torch.Tensor) -> torch.Tensor:
        points = torch.as_tensor(points, dtype=torch.float32)
        parts = [model.query(planes, part[None].to(planes.device, planes.dtype))[1][0].float().clamp(0, 1).cpu()
                 for part in points.split(chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, 3)

    return colour


def decimate(vertices: np.ndarray, faces: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertex clustering down to at most `max_faces` faces: vertices in one cubic cell merge to their mean;
    faces that collapse or repeat are dropped (winding kept). A mesh already small enough is returned as is.
    The cell starts at the size that would leave about `max_faces` faces on a smooth surface and grows by
    25% until the count fits."""
    if max_faces < 4:
        raise ValueError(f"max_faces must be >= 4, got {max_faces}")
    vertices, faces = np.asarray(vertices, np.float64), np.asarray(faces, np.int64)
    if len(faces) <= max_faces:
        return vertices, faces
    low = vertices.min(0)
    edges = np.linalg.norm(vertices[faces[:, 0]] - vertices[faces[:, 1]], axis=1)
    cell = edges.mean() * np.sqrt(len(faces) / max_faces)
    while True:
        keys = np.floor((vertices - low) / cell).astype(np.int64)
        _, cluster, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        cluster = cluster.reshape(-1)
        merged = np.zeros((len(counts), 3))
        np.add.at(merged, cluster, vertices)
        merged /= counts[:, None]
        new = cluster[faces]
        new = new[(new[:, 0] != new[:, 1]) & (new[:, 1] != new[:, 2]) & (new[:, 0] != new[:, 2])]
        _, first = np.unique(np.sort(new, axis=1), axis=0, return_index=True)
        new = new[np.sort(first)]
        if len(new) <= max_faces:
            used, remap = np.unique(new, return_inverse=True)
            return merged[used], remap.reshape(-1, 3)
        cell *= 1.25


def unwrap(vertices: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
                 timings: dict | None = None, log: Callable[[str], None] | None = None, progress: bool = False):
    """`mesh` (trimesh.Trimesh) -> a new trimesh.Trimesh, decimated to at most `max_faces` faces, with UVs and a
    `size`^2 base-colour texture (PBR material) baked from `colour` (see `field_colour`).
    `timings`: filled with the seconds of each step (decimate, unwrap, bake, dilate); `log`: called with one line
    saying how far the mesh was decimated; `progress`: a tqdm bar of the 4 steps on stderr."""
    import trimesh
    from PIL import Image
    from tqdm import tqdm

    if size < 8:
        raise ValueError(f"texture size must be >= 8 texels, got {size}")
    timings = {} if timings is None else timings
    bar = tqdm(total=4, desc="texture", unit="step", disable=not progress, leave=False)
    clock = time.perf_counter()

    def done(step: str) -> None:
        nonlocal clock
        timings[step], clock = time.perf_counter() - clock, time.perf_counter()
        bar.update()

    with bar:
        vertices, faces = decimate(mesh.vertices, mesh.faces, max_faces)
        if log is not None and len(faces) < len(mesh.faces):
            log(f"decimated {len(mesh.faces)} -> {len(faces)} faces (--max_faces {max_faces})")
        done("decimate")
        vmapping, faces, uv = unwrap(vertices, faces, size)
        vertices = vertices[vmapping]
        done("unwrap")
        face_of, bary = rasterise(uv, faces, size)
        mask = face_of >= 0
        points = np.einsum("nk,nkd->nd", bary[mask], vertices[faces[face_of[mask]]])
        image = torch.zeros(size, size, 3)
        image[torch.from_numpy(mask)] = colour(torch.from_numpy(points).float())
        done("bake")
        image = dilate(image, torch.from_numpy(mask))
        texture = Image.fromarray((image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
        done("dilate")
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=texture, metallicFactor=0.0,
                                                   roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)


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
