"""Render 3D asset files as RGBA views with a real rasteriser (moderngl, headless EGL by default).

Up axis: the world is +z up, but glTF is +y up by its specification, and so are the OBJ and PLY files of the
usual tools (Blender's default OBJ export, most model sites). `load_asset` is the one place an asset enters
the world: with `up="y"` (the default) it maps file +y to world +z and file +z (glTF's front) to world +x,
where the azimuth-0 camera is, so a glTF model faces the first view of an orbit; file +x goes to world +y
(a rotation, no mirror). `up="z"` loads a file that is already +z up unrotated.

Cameras follow `vfusion3d_lightning.cameras`: cam-to-world poses in the OpenGL convention (the camera looks
along its -z, +y up), world +z up, radians, pixel intrinsics. Images have row 0 at the top, and a point at
OpenCV camera coordinates (x, y, z) lands on pixel coordinates u = fx x / z + cx, v = fy y / z + cy, with
pixel (col, row) covering [col, col + 1) x [row, row + 1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import moderngl
import numpy as np
import torch
import trimesh
from PIL import Image

from vfusion3d_lightning.cameras import (
    DEFAULT_INTRINSICS,
    Y_UP_TO_WORLD,
    Intrinsics,
    look_at,
    orbit_azimuths,
    spherical_to_cartesian,
)

_GREY = np.array([128, 128, 128, 255], dtype=np.uint8)
_WHITE = np.array([255, 255, 255, 255], dtype=np.uint8)
_MAX_TILE = 1024  # largest side of one texture in a packed atlas
_TILE_PAD = 2  # atlas pixels of edge padding, so linear filtering doesn't bleed between tiles


UP_AXES = ("y", "z")


class AssetLoadError(ValueError):
    """An asset file that cannot be used: unreadable, without faces, or with non-finite vertices."""


# ---------------------------------------------------------------- loading


def _texture_of(part: trimesh.Trimesh) -> tuple[np.ndarray, Image.Image] | None:
    """(uv (V, 2), image) of a textured part, or None when it has no usable texture."""
    visual = part.visual
    if not isinstance(visual, trimesh.visual.TextureVisuals):
        return None
    uv = visual.uv
    if uv is None or len(uv) != len(part.vertices) or visual.material is None:
        return None
    image = getattr(visual.material, "baseColorTexture", None)
    if image is None:
        image = getattr(visual.material, "image", None)
    return None if image is None else (np.asarray(uv, dtype=np.float64), image)


def _colored(part: trimesh.Trimesh) -> tuple[trimesh.Trimesh, np.ndarray]:
    """An untextured part and its per-vertex RGBA (V, 4) uint8: vertex, face or material colour, else grey."""
    visual = part.visual
    if isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind == "vertex":
        return part, np.asarray(visual.vertex_colors, dtype=np.uint8)
    if isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind == "face":
        # unmerge so each face keeps its own colour instead of a blend at shared vertices
        vertices = part.vertices[part.faces].reshape(-1, 3)
        faces = np.arange(len(vertices)).reshape(-1, 3)
        colours = np.repeat(np.asarray(visual.face_colors, dtype=np.uint8), 3, axis=0)
        return trimesh.Trimesh(vertices, faces, process=False), colours
    colour = _GREY
    material = getattr(visual, "material", None)
    if material is not None and getattr(material, "main_color", None) is not None:
        colour = np.asarray(material.main_color, dtype=np.uint8)
    return part, np.tile(colour, (len(part.vertices), 1))


def _pack_atlas(images: list[Image.Image]) -> tuple[Image.Image, np.ndarray]:
    """Pack images, plus one white tile, as equal square tiles on a grid.

    Returns the atlas and, per tile (the white one last), its (u0, v0, du, dv) in atlas UV space (v up).
    """
    size = min(_MAX_TILE, max(max(im.size) for im in images))
    tiles = [im.convert("RGB").resize((size, size), Image.BILINEAR) for im in images]
    tiles.append(Image.new("RGB", (size, size), (255, 255, 255)))
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    cell = size + 2 * _TILE_PAD
    atlas = np.zeros((rows * cell, cols * cell, 3), dtype=np.uint8)
    rects = []
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        padded = np.pad(np.asarray(tile), ((_TILE_PAD, _TILE_PAD), (_TILE_PAD, _TILE_PAD), (0, 0)), mode="edge")
        atlas[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = padded
        u0 = (c * cell + _TILE_PAD) / atlas.shape[1]
        v0 = 1.0 - ((r + 1) * cell - _TILE_PAD) / atlas.shape[0]  # UV v grows upwards, rows downwards
        rects.append((u0, v0, size / atlas.shape[1], size / atlas.shape[0]))
    return Image.fromarray(atlas), np.asarray(rects)


def _wrap_uv(part: trimesh.Trimesh, uv: np.ndarray) -> tuple[trimesh.Trimesh, np.ndarray]:
    """Bring repeating UVs into [0, 1] face by face (an atlas tile cannot repeat); (V, 2) -> (V', 2)."""
    if uv.min() >= 0.0 and uv.max() <= 1.0:
        return part, uv
    vertices = part.vertices[part.faces].reshape(-1, 3)
    face_uv = uv[part.faces]
    face_uv = face_uv - np.floor(face_uv.mean(axis=1, keepdims=True))
    faces = np.arange(len(vertices)).reshape(-1, 3)
    return trimesh.Trimesh(vertices, faces, process=False), np.clip(face_uv.reshape(-1, 2), 0.0, 1.0)


def _merge_parts(parts: list[trimesh.Trimesh]) -> trimesh.Trimesh:
    """One mesh from several parts.

    Without textures: vertex colours. One textured part alone: its UVs and image unchanged. Otherwise the
    images are packed in an atlas and the untextured parts' colours go to `vertex_attributes["color"]`
    (V, 4) uint8, which the renderer multiplies with the texture (their UVs point at a white tile).
    """
    textures = [_texture_of(p) for p in parts]
    if all(t is None for t in textures):
        coloured = [_colored(p) for p in parts]
        meshes = [trimesh.Trimesh(m.vertices, m.faces, vertex_colors=c, process=False) for m, c in coloured]
        return trimesh.util.concatenate(meshes)
    if len(parts) == 1:
        uv, image = textures[0]
        visual = trimesh.visual.TextureVisuals(uv=uv, image=image)
        return trimesh.Trimesh(parts[0].vertices, parts[0].faces, visual=visual, process=False)
    atlas, rects = _pack_atlas([t[1] for t in textures if t is not None])
    vertices, faces, uvs, colours, tile, offset = [], [], [], [], 0, 0
    for part, texture in zip(parts, textures, strict=True):
        if texture is None:
            part, colour = _colored(part)
            uv = np.tile(rects[-1, :2] + 0.5 * rects[-1, 2:], (len(part.vertices), 1))
        else:
            part, uv = _wrap_uv(part, texture[0])
            uv = rects[tile, :2] + uv * rects[tile, 2:]
            colour, tile = np.tile(_WHITE, (len(part.vertices), 1)), tile + 1
        vertices.append(part.vertices)
        faces.append(part.faces + offset)
        uvs.append(uv)
        colours.append(colour)
        offset += len(part.vertices)
    visual = trimesh.visual.TextureVisuals(uv=np.concatenate(uvs), image=atlas)
    return trimesh.Trimesh(
        np.concatenate(vertices),
        np.concatenate(faces),
        visual=visual,
        vertex_attributes={"color": np.concatenate(colours)},
        process=False,
    )


def to_world(mesh: trimesh.Trimesh, up: str = "y") -> trimesh.Trimesh:
    """Turn a mesh read from a file whose up axis is `up` into the +z-up world, in place (see the module
    docstring); returns it. Code that measures a file's geometry in the world frame goes through this."""
    if up not in UP_AXES:
        raise ValueError(f"up must be one of {UP_AXES} (the asset file's up axis), got {up!r}")
    if up == "y":
        mesh.apply_transform(Y_UP_TO_WORLD)  # a permutation of the axes: exact in floating point
    return mesh


def load_asset(path: str | os.PathLike, up: str = "y") -> trimesh.Trimesh:
    """Load a GLB/GLTF, OBJ or PLY file as one mesh in the +z-up world, normalised to fit [-0.5, 0.5]^3.

    up: the file's up axis, "y" (glTF's, and most tools') or "z"; a +y-up file is turned as the module
    docstring says. Scene transforms are applied and all parts merged, keeping textures (UV + image) or
    colours (vertex, face or material; mid-grey if none). The bounding box is centred at the origin and its
    longest side scaled to 1. Raises AssetLoadError (naming the path) for unreadable files, no faces, or NaN/inf.
    """
    if up not in UP_AXES:
        raise ValueError(f"up must be one of {UP_AXES} (the asset file's up axis), got {up!r}")
    path = Path(path)
    try:
        # process=False: merging vertices would mix the colours of coincident vertices
        scene = trimesh.load(path, force="scene", process=False)
        parts = [g for g in scene.dump(concatenate=False) if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    except Exception as exc:
        raise AssetLoadError(f"{path}: cannot read the asset ({type(exc).__name__}: {exc})") from exc
    if not parts:
        raise AssetLoadError(f"{path}: the asset has no faces")
    if not all(np.isfinite(p.vertices).all() for p in parts):
        raise AssetLoadError(f"{path}: the asset has NaN or inf vertex coordinates")
    mesh = to_world(_merge_parts(parts), up)
    lo, hi = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    if (hi - lo).max() <= 0:
        raise AssetLoadError(f"{path}: the asset is a single point (zero-size bounding box)")
    mesh.apply_translation(-(lo + hi) / 2)
    mesh.apply_scale(1.0 / (hi - lo).max())
    return mesh


# ---------------------------------------------------------------- cameras


def scale_intrinsics(intrinsics: Intrinsics, width: int, height: int | None = None) -> Intrinsics:
    """The same camera for a `width` x `height` image (height defaults to width)."""
    height = width if height is None else height
    sx, sy = width / intrinsics.width, height / intrinsics.height
    return Intrinsics(intrinsics.fx * sx, intrinsics.fy * sy, intrinsics.cx * sx, intrinsics.cy * sy, width, height)


def default_intrinsics(resolution: int) -> Intrinsics:
    """The released model's intrinsics at `resolution`: fx = fy = 0.75 res, cx = cy = res / 2."""
    return scale_intrinsics(DEFAULT_INTRINSICS, resolution)


@dataclass
class CameraSet:
    """Views of one asset: poses (N, 4, 4) cam-to-world, azimuths and elevations (N,) radians, float32."""

    poses: np.ndarray
    azimuths: np.ndarray
    elevations: np.ndarray
    intrinsics: Intrinsics = DEFAULT_INTRINSICS

    def __len__(self) -> int:
        return len(self.poses)


def _camera_set(azimuths, elevations, radius: float, offsets=None, resolution: int | None = None) -> CameraSet:
    """Cameras on a sphere of `radius` (plus optional position offsets (N, 3)) looking at the origin."""
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    azimuths = np.asarray(azimuths, dtype=np.float64) % (2 * math.pi)
    elevations = np.asarray(elevations, dtype=np.float64)
    if not np.all(np.abs(elevations) < math.pi / 2):
        raise ValueError("elevations must lie in (-pi/2, pi/2) radians")
    positions = spherical_to_cartesian(torch.from_numpy(azimuths), torch.from_numpy(elevations), radius)
    if offsets is not None:
        positions = positions + torch.from_numpy(np.asarray(offsets, dtype=np.float64))
    intrinsics = DEFAULT_INTRINSICS if resolution is None else default_intrinsics(resolution)
    return CameraSet(
        poses=look_at(positions.float()).numpy().astype(np.float32),
        azimuths=azimuths.astype(np.float32),
        elevations=elevations.astype(np.float32),
        intrinsics=intrinsics,
    )


def orbit_cameras(
    rng: np.random.Generator,
    n_views: int = 16,
    radius: float = 1.5,
    elevation_range: tuple[float, float] = (0.0, math.pi / 4),
    offset_noise: float = 0.05,
    resolution: int | None = None,
    random_start_azimuth: bool = False,
) -> CameraSet:
    """The VFusion3D orbit: azimuths 2*pi*i/n from 0 (the paper's first frame is the 0-azimuth view, at +x,
    which a +y-up glTF model faces after `load_asset`), one random elevation for all views, fixed distance,
    and per view a camera-position offset uniform in [-offset_noise, offset_noise]^3.

    random_start_azimuth: start the orbit at a uniformly random azimuth instead of 0.
    The cameras still look at the origin. azimuths/elevations record the orbit before the offsets.
    """
    start = float(rng.uniform(0.0, 2 * math.pi))  # drawn either way: a seed gives the same elevation and offsets
    azimuths = orbit_azimuths(n_views, start if random_start_azimuth else 0.0).double().numpy()
    elevation = rng.uniform(*elevation_range)
    offsets = rng.uniform(-offset_noise, offset_noise, size=(n_views, 3))
    return _camera_set(azimuths, np.full(n_views, elevation), radius, offsets, resolution)


def random_cameras(
    rng: np.random.Generator,
    n_views: int = 32,
    radius: float = 1.5,
    elevation_range: tuple[float, float] = (-math.pi / 6, math.pi / 3),
    resolution: int | None = None,
) -> CameraSet:
    """Independent views: azimuth uniform in [0, 2*pi), elevation uniform in `elevation_range`."""
    azimuths = rng.uniform(0.0, 2 * math.pi, size=n_views)
    elevations = rng.uniform(*elevation_range, size=n_views)
    return _camera_set(azimuths, elevations, radius, resolution=resolution)


def uniform_cameras(
    n_views: int = 32,
    radius: float = 1.5,
    elevations: tuple[float, ...] = (-math.pi / 12, math.pi / 12, math.pi / 4, 5 * math.pi / 12),
    resolution: int | None = None,
) -> CameraSet:
    """Deterministic even coverage: rings at `elevations`, views split evenly over the rings (the
    first rings take the remainder), each ring's azimuths evenly spaced and staggered from ring to ring."""
    if n_views < 1 or not elevations:
        raise ValueError(f"need n_views >= 1 and at least one elevation, got {n_views} and {elevations}")
    counts = [n_views // len(elevations) + (i < n_views % len(elevations)) for i in range(len(elevations))]
    azimuths, ring_elevations = [], []
    for ring, (count, elevation) in enumerate(zip(counts, elevations, strict=True)):
        if count:
            stagger = math.pi / count * (ring % 2)
            azimuths.append(orbit_azimuths(count, stagger).double().numpy())
            ring_elevations.append(np.full(count, elevation))
    return _camera_set(np.concatenate(azimuths), np.concatenate(ring_elevations), radius, resolution=resolution)


# ---------------------------------------------------------------- rasteriser


def projection_matrix(intrinsics: Intrinsics, near: float, far: float) -> np.ndarray:
    """OpenGL clip-from-camera matrix that reproduces the pinhole intrinsics exactly: (4, 4).

    NDC x = 2u/W - 1 and NDC y = 2v/H - 1, so GL's window row 0 (its bottom) is image row 0; the image
    read back from GL (bottom row first) is therefore already top row first.
    """
    k = intrinsics
    w, h = k.width, k.height
    return np.array(
        [
            [2 * k.fx / w, 0.0, 1.0 - 2 * k.cx / w, 0.0],
            # y_cv = -y_gl, z_cv = -z_gl: NDC y = 2 (fy y_cv / z_cv + cy) / H - 1
            [0.0, -2 * k.fy / h, 1.0 - 2 * k.cy / h, 0.0],
            [0.0, 0.0, -(far + near) / (far - near), -2 * far * near / (far - near)],
            [0.0, 0.0, -1.0, 0.0],
        ]
    )


def crease_normals(vertices: np.ndarray, faces: np.ndarray, crease: float = math.radians(40)) -> np.ndarray:
    """Per-corner normals, smooth across edges flatter than `crease`, sharp across the others.

    vertices: (V, 3), faces: (F, 3) -> (F, 3, 3). Coincident vertices are treated as one, so split
    (textured) meshes still shade smoothly. Very high-valence meshes fall back to flat normals.
    """
    cross = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    unit = cross / np.maximum(np.linalg.norm(cross, axis=1, keepdims=True), 1e-20)
    _, vid = np.unique(np.round(vertices, 6), axis=0, return_inverse=True)
    corner_v = vid.reshape(-1)[faces].reshape(-1)
    corner_f = np.repeat(np.arange(len(faces)), 3)
    counts = np.bincount(corner_v)
    order = np.argsort(corner_v, kind="stable")
    degree = counts[corner_v[order]]
    if int((degree.astype(np.int64)).sum()) > 20_000_000:
        return np.repeat(unit[:, None], 3, axis=1)
    # all pairs (i, j) of corners that share a vertex
    i = np.repeat(order, degree)
    group_start = (np.cumsum(counts) - counts)[corner_v[order]]
    k = np.arange(len(i)) - np.repeat(np.cumsum(degree) - degree, degree)
    j = order[np.repeat(group_start, degree) + k]
    keep = (unit[corner_f[i]] * unit[corner_f[j]]).sum(axis=1) > math.cos(crease)
    summed = np.stack(
        [np.bincount(i[keep], weights=cross[corner_f[j[keep]], d], minlength=len(corner_f)) for d in range(3)],
        axis=1,
    )
    norm = np.linalg.norm(summed, axis=1, keepdims=True)
    return (summed / np.maximum(norm, 1e-20)).reshape(-1, 3, 3)


_VERTEX_SHADER = """
#version 330
uniform mat4 mvp;
in vec3 in_pos;
in vec3 in_normal;
in vec4 in_color;
in vec2 in_uv;
out vec3 v_pos;
out vec3 v_normal;
out vec4 v_color;
out vec2 v_uv;
void main() {
    gl_Position = mvp * vec4(in_pos, 1.0);
    v_pos = in_pos;
    v_normal = in_normal;
    v_color = in_color;
    v_uv = in_uv;
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform sampler2D albedo_map;
uniform vec3 eye;
uniform float ambient;
uniform float diffuse;
in vec3 v_pos;
in vec3 v_normal;
in vec4 v_color;
in vec2 v_uv;
out vec4 f_color;
void main() {
    vec3 n = v_normal;
    // degenerate vertex normal: use the face's own normal
    if (dot(n, n) < 1e-12) n = cross(dFdx(v_pos), dFdy(v_pos));
    float facing = abs(dot(normalize(n), normalize(eye - v_pos)));  // two-sided light at the camera
    vec3 albedo = v_color.rgb * texture(albedo_map, v_uv).rgb;
    f_color = vec4(clamp(albedo * (ambient + diffuse * facing), 0.0, 1.0), 1.0);
}
"""


def _corner_attributes(mesh: trimesh.Trimesh) -> tuple[np.ndarray, Image.Image | None]:
    """Interleaved per-corner vertex data (3F, 12): position, normal, RGBA in [0, 1], UV; and the texture."""
    faces = np.asarray(mesh.faces)
    texture = _texture_of(mesh)
    colours = mesh.vertex_attributes.get("color") if texture is not None else None
    if texture is None and isinstance(mesh.visual, trimesh.visual.ColorVisuals) and mesh.visual.kind == "vertex":
        colours = mesh.visual.vertex_colors
    if colours is None:
        colours = _colored(mesh)[1] if texture is None else np.tile(_WHITE, (len(mesh.vertices), 1))
    uv = texture[0] if texture is not None else np.zeros((len(mesh.vertices), 2))
    data = np.concatenate(
        [
            mesh.vertices[faces],
            crease_normals(np.asarray(mesh.vertices), faces),
            np.asarray(colours, dtype=np.float64)[faces] / 255.0,
            uv[faces],
        ],
        axis=2,
    )
    return data.reshape(-1, 12).astype(np.float32), None if texture is None else texture[1]


class MeshRenderer:
    """Rasterises meshes into RGBA views with one reusable headless OpenGL context.

    resolution: default square image size (used by `render_asset`); `render` follows the intrinsics' size.
    backend: moderngl standalone backend ('egl' headless; None for the platform default).
    samples: MSAA samples per pixel (clamped to what the driver offers; 0 or 1 turns it off).
    ambient, diffuse: shading = albedo * (ambient + diffuse * |n . l|), light at the camera.
    """

    def __init__(
        self,
        resolution: int,
        backend: str | None = "egl",
        samples: int = 4,
        ambient: float = 0.35,
        diffuse: float = 0.65,
        near: float = 0.01,
        far: float = 100.0,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if not 0 < near < far:
            raise ValueError(f"need 0 < near < far, got near={near} far={far}")
        self.resolution, self.near, self.far = resolution, near, far
        kwargs = {} if backend is None else {"backend": backend}
        self.ctx = moderngl.create_standalone_context(**kwargs)
        self.samples = 0 if samples <= 1 else min(samples, self.ctx.max_samples)
        self.program = self.ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.program["ambient"].value = ambient
        self.program["diffuse"].value = diffuse
        self._targets: dict[tuple[int, int], tuple[moderngl.Framebuffer, moderngl.Framebuffer]] = {}

    @property
    def intrinsics(self) -> Intrinsics:
        """The default intrinsics at this renderer's resolution."""
        return default_intrinsics(self.resolution)

    def _framebuffers(self, size: tuple[int, int]) -> tuple[moderngl.Framebuffer, moderngl.Framebuffer]:
        """(multisampled draw target, single-sample resolve target), float colour so un-premultiplying is exact."""
        if size not in self._targets:
            ctx = self.ctx
            draw = ctx.framebuffer(
                color_attachments=[ctx.renderbuffer(size, 4, samples=self.samples, dtype="f4")],
                depth_attachment=ctx.depth_renderbuffer(size, samples=self.samples),
            )
            resolve = ctx.framebuffer(color_attachments=[ctx.renderbuffer(size, 4, dtype="f4")])
            self._targets[size] = (draw, resolve)
        return self._targets[size]

    def _texture(self, image: Image.Image | None) -> moderngl.Texture:
        """GL texture of the albedo image (white 1x1 without one); rows flipped so GL's t equals UV v."""
        if image is None:
            return self.ctx.texture((1, 1), 4, _WHITE.tobytes())
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGBA"))[::-1])
        texture = self.ctx.texture(image.size, 4, pixels.tobytes())
        texture.build_mipmaps()
        texture.filter = (moderngl.LINEAR_MIPMAP_LINEAR, moderngl.LINEAR)
        return texture

    def render(self, mesh: trimesh.Trimesh, poses: np.ndarray, intrinsics: Intrinsics | None = None) -> np.ndarray:
        """Render `mesh` from cam-to-world `poses` (N, 4, 4) -> RGBA (N, H, W, 4) uint8.

        Alpha is the MSAA coverage; RGB is straight (not premultiplied) colour and 255 where alpha is 0.
        Intrinsics default to this renderer's resolution; the image size is the intrinsics'.
        """
        intrinsics = self.intrinsics if intrinsics is None else intrinsics
        poses = np.asarray(poses, dtype=np.float64)
        poses = poses[None] if poses.ndim == 2 else poses
        if poses.shape[1:] != (4, 4) or not np.isfinite(poses).all():
            raise ValueError(f"poses must be finite (N, 4, 4) cam-to-world matrices, got shape {poses.shape}")
        size = (intrinsics.width, intrinsics.height)
        draw, resolve = self._framebuffers(size)
        data, image = _corner_attributes(mesh)
        vbo = self.ctx.buffer(data.tobytes())
        vao = self.ctx.vertex_array(self.program, [(vbo, "3f 3f 4f 2f", "in_pos", "in_normal", "in_color", "in_uv")])
        texture = self._texture(image)
        projection = projection_matrix(intrinsics, self.near, self.far)
        out = np.empty((len(poses), size[1], size[0], 4), dtype=np.uint8)
        try:
            texture.use(0)
            self.program["albedo_map"].value = 0
            self.ctx.enable(moderngl.DEPTH_TEST)
            self.ctx.disable(moderngl.CULL_FACE)
            for n, pose in enumerate(poses):
                draw.use()  # the resolve copy below may rebind framebuffers
                mvp = projection @ np.linalg.inv(pose)
                self.program["mvp"].write(mvp.T.astype("f4").tobytes())  # GLSL wants column-major
                self.program["eye"].value = tuple(pose[:3, 3])
                draw.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
                vao.render(moderngl.TRIANGLES)
                self.ctx.copy_framebuffer(resolve, draw)
                rgba = np.frombuffer(resolve.read(components=4, dtype="f4"), dtype=np.float32)
                out[n] = _straight_rgba(rgba.reshape(size[1], size[0], 4))
        finally:
            vao.release()
            vbo.release()
            texture.release()
        return out

    def close(self) -> None:
        """Release the GL context and everything made in it."""
        if self.ctx is not None:
            for draw, resolve in self._targets.values():
                for fbo in (draw, resolve):
                    for attachment in (*fbo.color_attachments, fbo.depth_attachment):
                        if attachment is not None:
                            attachment.release()
                    fbo.release()
            self._targets.clear()
            self.program.release()
            self.ctx.release()
            self.ctx = None

    def __enter__(self) -> "MeshRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _straight_rgba(premultiplied: np.ndarray) -> np.ndarray:
    """Resolved premultiplied float RGBA (H, W, 4) -> straight uint8 RGBA, white where alpha is 0."""
    alpha = np.clip(premultiplied[..., 3:], 0.0, 1.0)
    alpha8 = np.round(alpha * 255)
    rgb = np.where(alpha8 > 0, premultiplied[..., :3] / np.maximum(alpha, 1e-6), 1.0)
    return np.concatenate([np.round(np.clip(rgb, 0.0, 1.0) * 255), alpha8], axis=-1).astype(np.uint8)


def render_asset(renderer: MeshRenderer, path: str | os.PathLike, cameras: CameraSet, up: str = "y") -> np.ndarray:
    """Load (file up axis `up`, see `load_asset`), normalise and render one asset file at the renderer's
    resolution -> (N, H, W, 4) uint8.

    The cameras' intrinsics are rescaled to the renderer's square resolution when their size differs.
    """
    intrinsics = cameras.intrinsics
    if (intrinsics.width, intrinsics.height) != (renderer.resolution, renderer.resolution):
        intrinsics = scale_intrinsics(intrinsics, renderer.resolution)
    return renderer.render(load_asset(path, up), cameras.poses, intrinsics)
