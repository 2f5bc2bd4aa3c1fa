"""Seeded procedural 3D assets: unions of coloured or textured primitives, for demos and tests.

Each asset is 1-5 primitives (box, sphere, cylinder, cone, capsule, torus) with random sizes, rotations and
positions. A part is either vertex-coloured (solid or a linear gradient) or textured with a small
procedurally drawn image (checker or stripes) through UV coordinates.

Style "tumbled" rotates every part uniformly at random, so nothing in a view tells which way is up. Style
"upright" stands the parts on a flat base and turns them only about the vertical (+z) axis, as most real
assets are modelled: the camera's elevation shows in the views (the base's outline flattens toward the
horizon), which the elevation estimator learns from.

Style "solid" is one primitive (no sphere: its outline has no up) of one saturated colour, standing upright and
turned about +z: the quickstart's data, whose outlines a tiny LRM learns to reconstruct in minutes of CPU
where the multi-part, textured upright assets give it one blob for every input.

Assets are generated in the project's +z-up world; their files are written +y up, as glTF's specification and
most tools' OBJ/PLY have it, so `render` (file up axis "y" by default) loads them back exactly as generated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Literal, Sequence, get_args

import numpy as np
import trimesh
from PIL import Image
from tqdm import tqdm

from vfusion3d_lightning.cameras import Y_UP_TO_WORLD
from vfusion3d_lightning.io import atomic_write

PRIMITIVES = ("box", "sphere", "cylinder", "cone", "capsule", "torus")
FORMATS = ("glb", "obj", "ply")
AssetStyle = Literal["tumbled", "upright", "solid"]
STYLES: tuple[str, ...] = get_args(AssetStyle)
_TEXTURED_PROBABILITY = 0.4
_WHITE = np.array([255, 255, 255, 255], dtype=np.uint8)


# ---------------------------------------------------------------- geometry


def _primitive(kind: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """One primitive centred near the origin, sizes roughly 0.1-0.8."""
    u = rng.uniform
    if kind == "box":
        return trimesh.creation.box(extents=u(0.2, 0.8, size=3))
    if kind == "sphere":
        return trimesh.creation.icosphere(subdivisions=int(rng.integers(2, 4)), radius=u(0.15, 0.4))
    if kind == "cylinder":
        return trimesh.creation.cylinder(radius=u(0.08, 0.3), height=u(0.2, 0.8), sections=24)
    if kind == "cone":
        return trimesh.creation.cone(radius=u(0.1, 0.35), height=u(0.2, 0.8), sections=24)
    if kind == "capsule":
        return trimesh.creation.capsule(height=u(0.2, 0.6), radius=u(0.08, 0.25), count=[16, 16])
    if kind == "torus":
        return trimesh.creation.torus(u(0.15, 0.35), u(0.04, 0.1), major_sections=32, minor_sections=12)
    raise ValueError(f"unknown primitive {kind!r}; choose one of {PRIMITIVES}")


def _random_transform(rng: np.random.Generator, spread: float) -> np.ndarray:
    """A uniformly random rotation plus a translation in [-spread, spread]^3: (4, 4)."""
    quaternion = rng.normal(size=4)
    transform = trimesh.transformations.quaternion_matrix(quaternion / np.linalg.norm(quaternion))
    transform[:3, 3] = rng.uniform(-spread, spread, size=3)
    return transform


# ---------------------------------------------------------------- colours and textures


def _random_colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> np.ndarray:
    """(4,) uint8 RGBA, opaque."""
    return np.append(rng.integers(low, high, size=3), 255).astype(np.uint8)


def gradient_colors(vertices: np.ndarray, start: np.ndarray, end: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Linear gradient from `start` to `end` along `direction` over the vertices' extent.

    vertices: (V, 3); start, end: (4,) uint8; direction: (3,) -> (V, 4) uint8.
    """
    t = vertices @ direction
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-12)
    return np.round(start + t[:, None] * (end.astype(np.float64) - start)).astype(np.uint8)


def _vertex_colours(mesh: trimesh.Trimesh, rng: np.random.Generator) -> np.ndarray:
    """Solid or gradient per-vertex colours: (V, 4) uint8."""
    start = _random_colour(rng)
    if rng.random() < 0.5:
        return np.tile(start, (len(mesh.vertices), 1))
    direction = rng.normal(size=3)
    return gradient_colors(mesh.vertices, start, _random_colour(rng), direction / np.linalg.norm(direction))


def pattern_texture(kind: str, cells: int, light: Sequence[int], dark: Sequence[int], size: int = 64) -> Image.Image:
    """A `size` x `size` RGB image: a `cells` x `cells` checker or `cells` vertical stripes."""
    idx = np.arange(size) * cells // size
    if kind == "checker":
        mask = (idx[:, None] + idx[None, :]) % 2 == 0
    elif kind == "stripes":
        mask = np.broadcast_to(idx[None, :] % 2 == 0, (size, size))
    else:
        raise ValueError(f"unknown texture pattern {kind!r}; choose 'checker' or 'stripes'")
    pixels = np.where(mask[..., None], np.asarray(light, np.uint8)[:3], np.asarray(dark, np.uint8)[:3])
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def _random_texture(rng: np.random.Generator) -> Image.Image:
    """A checker or stripes image with one light and one dark colour, so the pattern always shows."""
    kind = ("checker", "stripes")[int(rng.integers(2))]
    cells = int(rng.choice([2, 4, 8]))
    return pattern_texture(kind, cells, _random_colour(rng, 160, 256), _random_colour(rng, 0, 90))


def triplanar_uv(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unmerge faces and project each face on the box plane facing its normal.

    Faces are unmerged so each face gets its own projection without seams.
    Returns vertices (3F, 3), faces (F, 3) and uv (3F, 2) in [0, 1].
    """
    vertices = mesh.vertices[mesh.faces].reshape(-1, 3)
    faces = np.arange(len(vertices)).reshape(-1, 3)
    lo, span = mesh.bounds[0], np.maximum(mesh.extents, 1e-9)
    local = (vertices - lo) / span
    axis = np.repeat(np.abs(mesh.face_normals).argmax(axis=1), 3)
    # the two axes that are not the face's dominant normal axis
    planes = np.array([[1, 2], [0, 2], [0, 1]])[axis]
    uv = np.take_along_axis(local, planes, axis=1)
    return vertices, faces, uv


def apply_texture(mesh: trimesh.Trimesh, image: Image.Image) -> trimesh.Trimesh:
    """A copy of `mesh` with triplanar UVs and `image` as its texture (white diffuse so it isn't tinted)."""
    vertices, faces, uv = triplanar_uv(mesh)
    material = trimesh.visual.material.SimpleMaterial(image=image, diffuse=_WHITE, ambient=_WHITE)
    visual = trimesh.visual.TextureVisuals(uv=uv, material=material)
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)


def _decorate(mesh: trimesh.Trimesh, rng: np.random.Generator) -> trimesh.Trimesh:
    """Give a part a texture or vertex colours."""
    if rng.random() < _TEXTURED_PROBABILITY:
        return apply_texture(mesh, _random_texture(rng))
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=_vertex_colours(mesh, rng))
    return mesh


# ---------------------------------------------------------------- assets


def generate_asset(seed: int, style: str = "tumbled") -> trimesh.Trimesh | trimesh.Scene:
    """A random asset, fully determined by `seed` and `style` (see the module docstring).

    Returns a Trimesh for a one-part asset, else a Scene with one node per part (part transforms live
    in the scene graph). Vertices are in about [-1, 1]^3; callers normalise.
    """
    if style not in STYLES:
        raise ValueError(f"unknown asset style {style!r}; choose one of {STYLES}")
    rng = np.random.default_rng(seed)
    if style == "upright":
        return _upright_asset(rng)
    if style == "solid":
        return _solid_asset(rng)
    n_parts = int(rng.integers(1, 6))
    scene = trimesh.Scene()
    for i in range(n_parts):
        kind = PRIMITIVES[int(rng.integers(len(PRIMITIVES)))]
        part = _decorate(_primitive(kind, rng), rng)
        # the first part sits at the centre so parts cluster around it
        transform = _random_transform(rng, spread=0.0 if i == 0 else 0.35)
        if n_parts == 1:
            return part.apply_transform(transform)
        scene.add_geometry(part, node_name=f"part{i}", geom_name=f"part{i}", transform=transform)
    return scene


def _upright_asset(rng: np.random.Generator) -> trimesh.Scene:
    """A flat base (disc or slab) with 1-4 parts standing on it, each turned only about +z."""
    scene = trimesh.Scene()
    if rng.random() < 0.5:
        base = trimesh.creation.cylinder(radius=rng.uniform(0.45, 0.7), height=rng.uniform(0.04, 0.1), sections=48)
    else:
        base = trimesh.creation.box(extents=[*rng.uniform(0.8, 1.3, size=2), rng.uniform(0.04, 0.1)])
    base_top = base.bounds[1, 2]
    scene.add_geometry(_decorate(base, rng), node_name="base", geom_name="base")
    for i in range(int(rng.integers(1, 5))):
        kind = PRIMITIVES[int(rng.integers(len(PRIMITIVES)))]
        part = _decorate(_primitive(kind, rng), rng)
        transform = trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * np.pi), [0, 0, 1])
        transform[:2, 3] = rng.uniform(-0.3, 0.3, size=2)
        transform[2, 3] = base_top - part.bounds[0, 2]  # rests on the base
        scene.add_geometry(part, node_name=f"part{i}", geom_name=f"part{i}", transform=transform)
    return scene


# primitives whose outline shows the camera's elevation when they stand upright (a sphere's does not)
_SOLID_PRIMITIVES = ("box", "cylinder", "cone", "capsule", "torus")


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    """(4,) uint8 RGBA: a random hue at saturation and value 0.6-1, far from the grey every colour averages to."""
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    rgb = value * (1 - saturation * np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1))
    return np.append(np.round(rgb * 255), 255).astype(np.uint8)


def _solid_asset(rng: np.random.Generator) -> trimesh.Trimesh:
    """One primitive of one saturated colour, standing upright and turned only about +z."""
    kind = _SOLID_PRIMITIVES[int(rng.integers(len(_SOLID_PRIMITIVES)))]
    mesh = _primitive(kind, rng)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(rng.uniform(0, 2 * np.pi), [0, 0, 1]))
    colours = np.tile(_saturated_colour(rng), (len(mesh.vertices), 1))
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colours)
    return mesh


def asset_parts(asset: trimesh.Trimesh | trimesh.Scene) -> list[trimesh.Trimesh]:
    """The asset's meshes with their scene transforms applied, in part order."""
    if isinstance(asset, trimesh.Trimesh):
        return [asset]
    return [g for g in asset.dump(concatenate=False) if isinstance(g, trimesh.Trimesh)]


def baked_vertex_colors(mesh: trimesh.Trimesh) -> np.ndarray:
    """Per-vertex RGBA of a part, sampling its texture at the UVs when it has one: (V, 4) uint8."""
    if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        return np.asarray(mesh.visual.to_color().vertex_colors, dtype=np.uint8)
    return np.asarray(mesh.visual.vertex_colors, dtype=np.uint8)


# ---------------------------------------------------------------- writers


def _ply_bytes(asset: trimesh.Trimesh | trimesh.Scene) -> bytes:
    """Binary PLY with vertex colours; textures are baked since PLY has none."""
    parts = [
        trimesh.Trimesh(p.vertices, p.faces, vertex_colors=baked_vertex_colors(p), process=False)
        for p in asset_parts(asset)
    ]
    return trimesh.util.concatenate(parts).export(file_type="ply")


def _fmt(rows: np.ndarray, prefix: str, fmt: str) -> list[str]:
    return [prefix + " " + " ".join(fmt % x for x in row) for row in rows]


def _obj_files(asset: trimesh.Trimesh | trimesh.Scene, stem: str) -> dict[str, bytes]:
    """OBJ text, its MTL and one PNG per textured part: {file name: bytes}.

    Written by hand because trimesh's writer loses vertex colours when a file mixes coloured and textured
    parts. Coloured parts come first, before any `usemtl`, so the reader gives them no material; every
    `v` line has a colour so the reader keeps them.
    """
    parts = sorted(asset_parts(asset), key=lambda p: isinstance(p.visual, trimesh.visual.TextureVisuals))
    obj, mtl, files = [f"mtllib {stem}.mtl"], [], {}
    n_v = n_vt = 0
    for i, part in enumerate(parts):
        textured = isinstance(part.visual, trimesh.visual.TextureVisuals)
        colours = np.tile(_WHITE, (len(part.vertices), 1)) if textured else part.visual.vertex_colors
        obj.append(f"o part{i}")
        if textured:
            name = f"{stem}_part{i}"
            obj.append(f"usemtl {name}")
            mtl += [f"newmtl {name}", "Ka 1 1 1", "Kd 1 1 1", "Ks 0 0 0", f"map_Kd {name}.png", ""]
            png = trimesh.util.BytesIO()
            part.visual.material.image.save(png, format="PNG")
            files[f"{name}.png"] = png.getvalue()
        v = np.column_stack([part.vertices, np.asarray(colours)[:, :3] / 255.0])
        obj += _fmt(v, "v", "%.6f")
        if textured:
            obj += _fmt(part.visual.uv, "vt", "%.6f")
            corners = np.stack([part.faces + 1 + n_v, part.faces + 1 + n_vt], axis=-1).reshape(-1, 6)
            obj += [f"f {a}/{b} {c}/{d} {e}/{f}" for a, b, c, d, e, f in corners]
            n_vt += len(part.visual.uv)
        else:
            obj += [f"f {a} {b} {c}" for a, b, c in part.faces + 1 + n_v]
        n_v += len(part.vertices)
    files[f"{stem}.mtl"] = "\n".join(mtl).encode()
    files[f"{stem}.obj"] = ("\n".join(obj) + "\n").encode()  # last: its presence marks a complete asset
    return files


def in_file_frame(asset: trimesh.Trimesh | trimesh.Scene) -> trimesh.Trimesh | trimesh.Scene:
    """A copy of a +z-up world asset turned into the files' +y-up frame (the inverse of what `load_asset` does)."""
    # the transpose of an axis permutation is its exact inverse
    return asset.copy().apply_transform(Y_UP_TO_WORLD.T)


def asset_files(asset: trimesh.Trimesh | trimesh.Scene, stem: str, fmt: str) -> dict[str, bytes]:
    """The files of one asset in format `fmt` ('glb', 'obj' or 'ply'), +y up, main file last: {name: bytes}."""
    asset = in_file_frame(asset)
    if fmt == "glb":
        return {f"{stem}.glb": trimesh.Scene(asset).export(file_type="glb")}
    if fmt == "obj":
        return _obj_files(asset, stem)
    if fmt == "ply":
        return {f"{stem}.ply": _ply_bytes(asset)}
    raise ValueError(f"unknown asset format {fmt!r}; choose from {FORMATS}")


def write_assets(
    out_dir: str | os.PathLike,
    count: int,
    seed: int = 0,
    formats: Iterable[str] = FORMATS,
    progress: bool = True,
    style: str = "tumbled",
    prefix: str = "asset",
) -> list[Path]:
    """Write `count` assets as `{prefix}_{i:06d}.{fmt}`, formats cycling, asset i from seed `seed + i` in `style`.
    Sets that are used together (training and held out) need distinct prefixes: the file stem is the object id.

    Resumable: an asset whose main file exists is skipped. Every file is written atomically; for OBJ the
    MTL and PNGs go first. Returns the main file paths, in index order.
    """
    formats = tuple(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if not formats or unknown:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if style not in STYLES:
        raise ValueError(f"unknown asset style {style!r}; choose one of {STYLES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(count), desc="procedural assets", disable=not progress):
        fmt = formats[i % len(formats)]
        path = out / f"{prefix}_{i:06d}.{fmt}"
        if not path.exists():
            for name, data in asset_files(generate_asset(seed + i, style), path.stem, fmt).items():
                atomic_write(out / name, lambda tmp, data=data: tmp.write_bytes(data))
        paths.append(path)
    return paths
