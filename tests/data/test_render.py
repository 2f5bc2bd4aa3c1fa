"""The moderngl renderer: exact pinhole projection, colours and textures, asset loading, view sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image, ImageDraw

from vfusion3d_lightning.cameras import Intrinsics, look_at, spherical_to_cartesian
from vfusion3d_lightning.data.procedural import apply_texture, pattern_texture, write_assets
from vfusion3d_lightning.data.render import (
    AssetLoadError,
    CameraSet,
    MeshRenderer,
    load_asset,
    orbit_cameras,
    random_cameras,
    render_asset,
    uniform_cameras,
)

RES = 128


@pytest.fixture(scope="module")
def renderer():
    with MeshRenderer(RES) as r:
        yield r


@pytest.fixture(scope="module")
def asset_files(tmp_path_factory):
    """One procedural asset per format: glb, obj, ply."""
    return write_assets(tmp_path_factory.mktemp("assets"), 6, seed=3, progress=False)


def _pose(azimuth: float, elevation: float, radius: float = 1.5) -> np.ndarray:
    position = spherical_to_cartesian(torch.tensor(azimuth), torch.tensor(elevation), radius)
    return look_at(position).numpy().astype(np.float64)


def _project(points: np.ndarray, pose: np.ndarray, k: Intrinsics) -> np.ndarray:
    """Pinhole projection of world points (P, 3) -> pixel coordinates (P, 2), via OpenCV camera coords."""
    view = np.linalg.inv(pose)
    cam_gl = points @ view[:3, :3].T + view[:3, 3]
    x, y, z = cam_gl[:, 0], -cam_gl[:, 1], -cam_gl[:, 2]
    assert (z > 0).all()
    return np.stack([k.fx * x / z + k.cx, k.fy * y / z + k.cy], axis=1)


def _reference_silhouette(mesh: trimesh.Trimesh, pose: np.ndarray, k: Intrinsics, ss: int = 4) -> np.ndarray:
    """Rasterise the projected faces with PIL at `ss`x supersampling -> coverage > 0.5: (H, W) bool."""
    uv = _project(mesh.vertices, pose, k) * ss - 0.5  # PIL puts pixel centres on integers
    canvas = Image.new("L", (k.width * ss, k.height * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for face in mesh.faces:
        draw.polygon([tuple(p) for p in uv[face]], fill=255)
    coverage = np.asarray(canvas, dtype=np.float64).reshape(k.height, ss, k.width, ss).mean(axis=(1, 3)) / 255
    return coverage > 0.5


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---------------------------------------------------------------- projection


def test_silhouette_matches_pinhole_projection(renderer, asset_files):
    mesh = load_asset(asset_files[0])
    centred = Intrinsics(96.0, 96.0, 64.0, 64.0, RES, RES)
    # off-centre principal point, unequal focal lengths and a non-square image
    off_centre = Intrinsics(110.0, 90.0, 0.36 * 160, 0.6 * 112, 160, 112)
    views = [(centred, _pose(0.3, 0.4)), (off_centre, _pose(2.2, -0.3)), (off_centre, _pose(4.0, 0.9))]
    for k, pose in views:
        (image,) = renderer.render(mesh, pose[None], k)
        assert image.shape == (k.height, k.width, 4)
        rendered = image[..., 3] > 127
        reference = _reference_silhouette(mesh, pose, k)
        assert reference.sum() > 300  # the object is well inside the image, not a speck
        assert _iou(rendered, reference) > 0.95
    # the check can fail: ignoring the principal point or flipping rows breaks the agreement
    wrong = Intrinsics(110.0, 90.0, 80.0, 56.0, 160, 112)
    assert _iou(rendered, _reference_silhouette(mesh, pose, wrong)) < 0.8
    assert _iou(rendered, reference[::-1]) < 0.8


def test_render_asset_rescales_intrinsics_to_renderer(renderer, asset_files):
    cameras = orbit_cameras(np.random.default_rng(0), n_views=2)  # 512 x 512 intrinsics
    images = render_asset(renderer, asset_files[1], cameras)
    assert images.shape == (2, RES, RES, 4) and images.dtype == np.uint8
    mesh = load_asset(asset_files[1])
    k = Intrinsics(96.0, 96.0, 64.0, 64.0, RES, RES)
    for image, pose in zip(images, cameras.poses, strict=True):
        assert _iou(image[..., 3] > 127, _reference_silhouette(mesh, pose.astype(np.float64), k)) > 0.95


def test_renders_are_deterministic_and_background_is_white(renderer, asset_files):
    mesh = load_asset(asset_files[2])
    poses = uniform_cameras(4).poses
    first, second = renderer.render(mesh, poses), renderer.render(mesh, poses)
    np.testing.assert_array_equal(first, second)
    background = first[..., 3] == 0
    assert background.mean() > 0.3 and (first[background][:, :3] == 255).all()


# ---------------------------------------------------------------- colours and textures


def _red_cube() -> trimesh.Trimesh:
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    cube.visual = trimesh.visual.ColorVisuals(cube, vertex_colors=np.tile([255, 0, 0, 255], (8, 1)))
    return cube


def _checker_cube() -> trimesh.Trimesh:
    return apply_texture(
        trimesh.creation.box(extents=(1.0, 1.0, 1.0)), pattern_texture("checker", 4, (255,) * 3, (0,) * 3)
    )


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_vertex_colours_come_through(renderer, tmp_path):
    path = tmp_path / "red.ply"
    _red_cube().export(path)
    (image,) = render_asset(renderer, path, CameraSet(_pose(0.7, 0.5)[None], np.zeros(1), np.zeros(1)))
    inside, edge = image[..., 3] == 255, (image[..., 3] > 0) & (image[..., 3] < 255)
    assert inside.sum() > 1000 and edge.sum() > 50
    rgb = image[inside][:, :3].astype(int)
    assert (rgb[:, 0] > 80).all() and (rgb[:, 1:] < 10).all()
    # colour is straight, not premultiplied: partly covered pixels are as red as covered ones
    edge_red = image[edge][:, 0].astype(int)
    assert (edge_red >= rgb[:, 0].min() - 5).mean() > 0.95 and (image[edge][:, 1:3] < 10).all()


def test_texture_comes_through(renderer, tmp_path):
    path = tmp_path / "checker.glb"
    _checker_cube().export(path)
    (image,) = render_asset(renderer, path, CameraSet(_pose(0.7, 0.5)[None], np.zeros(1), np.zeros(1)))
    luminance = _luminance(image[image[..., 3] == 255][:, :3])
    assert len(luminance) > 1000
    assert (luminance > 120).mean() > 0.2 and (luminance < 40).mean() > 0.2


def test_mixed_textured_and_coloured_parts(renderer, tmp_path):
    """A textured and a vertex-coloured part in one file share one atlas in the renderer."""
    scene = trimesh.Scene()
    scene.add_geometry(_checker_cube(), transform=trimesh.transformations.translation_matrix([-0.7, 0, 0]))
    scene.add_geometry(_red_cube(), transform=trimesh.transformations.translation_matrix([0.7, 0, 0]))
    path = tmp_path / "mixed.glb"
    scene.export(path)
    mesh = load_asset(path, up="z")  # built in the +z-up world
    pose = _pose(-math.pi / 2, 0.4)
    (image,) = renderer.render(mesh, pose[None])
    # the normalised part centres: x = -+0.7 / 2.4
    centres = _project(np.array([[-0.7 / 2.4, 0, 0], [0.7 / 2.4, 0, 0]]), pose, renderer.intrinsics)
    split = int(round(centres[:, 0].mean()))
    checker_side, red_side = (slice(None, split), slice(split, None))
    if centres[0, 0] > centres[1, 0]:
        checker_side, red_side = red_side, checker_side
    inside = image[..., 3] == 255
    checker = _luminance(image[:, checker_side][inside[:, checker_side]][:, :3])
    red = image[:, red_side][inside[:, red_side]][:, :3].astype(int)
    assert len(checker) > 200 and len(red) > 200
    assert (checker > 120).mean() > 0.2 and (checker < 40).mean() > 0.2
    assert (red[:, 0] > 80).all() and (red[:, 1:] < 10).all()


# ---------------------------------------------------------------- loading


def test_load_asset_normalises_each_format(asset_files):
    assert {p.suffix for p in asset_files[:3]} == {".glb", ".obj", ".ply"}
    for path in asset_files[:3]:
        mesh = load_asset(path)
        lo, hi = mesh.bounds
        np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-6)
        assert abs((hi - lo).max() - 1.0) < 1e-6
        assert len(mesh.faces) > 0


def test_load_asset_keeps_textures_and_colours(asset_files):
    glb, obj, ply = (load_asset(p) for p in asset_files[:3])
    for mesh in (glb, obj):  # seed 3 and 4 assets mix textured and coloured parts
        assert isinstance(mesh.visual, trimesh.visual.TextureVisuals) and mesh.visual.material.image is not None
        colours = mesh.vertex_attributes["color"]
        assert len(colours) == len(mesh.vertices) and len(np.unique(colours, axis=0)) > 2
    assert ply.visual.kind == "vertex" and len(np.unique(ply.visual.vertex_colors, axis=0)) > 2


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("garbage.glb", b"not a mesh at all" * 4, "cannot read"),
        ("empty.ply", b"", "cannot read|no faces"),
        ("points.obj", b"v 0 0 0\nv 1 0 0\nv 0 1 0\n", "no faces"),
        ("nan.obj", b"v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", "NaN"),
    ],
)
def test_load_asset_rejects_bad_files(tmp_path, name, data, reason):
    path = _write(tmp_path / name, data)
    with pytest.raises(AssetLoadError, match=reason) as info:
        load_asset(path)
    assert str(path) in str(info.value)


def test_load_asset_missing_file(tmp_path):
    with pytest.raises(AssetLoadError, match="missing.glb"):
        load_asset(tmp_path / "missing.glb")


# ---------------------------------------------------------------- view sampling


def _check_looks_at_origin(poses: np.ndarray) -> None:
    forward = -poses[:, :3, 2]
    to_origin = -poses[:, :3, 3] / np.linalg.norm(poses[:, :3, 3], axis=1, keepdims=True)
    assert ((forward * to_origin).sum(axis=1) > 1 - 1e-5).all()
    np.testing.assert_allclose(poses[:, 3], np.tile([0, 0, 0, 1], (len(poses), 1)), atol=1e-7)


def test_orbit_cameras():
    cams = orbit_cameras(np.random.default_rng(0), n_views=16)
    assert cams.poses.shape == (16, 4, 4) and cams.poses.dtype == np.float32 and len(cams) == 16
    steps = np.diff(cams.azimuths.astype(np.float64)) % (2 * math.pi)
    np.testing.assert_allclose(steps, 2 * math.pi / 16, atol=1e-5)
    assert len(np.unique(cams.elevations)) == 1 and 0.0 <= cams.elevations[0] <= math.pi / 4
    distances = np.linalg.norm(cams.poses[:, :3, 3], axis=1)
    assert (np.abs(distances - 1.5) <= math.sqrt(3) * 0.05 + 1e-6).all()
    assert np.ptp(distances) > 0  # the offsets are there
    _check_looks_at_origin(cams.poses)
    # positions = the nominal orbit plus offsets within [-0.05, 0.05]^3
    nominal = spherical_to_cartesian(torch.from_numpy(cams.azimuths), torch.from_numpy(cams.elevations), 1.5)
    assert np.abs(cams.poses[:, :3, 3] - nominal.numpy()).max() <= 0.05 + 1e-6
    # the paper's orbit starts at azimuth 0 (the +x camera); elevation is random across draws; same seed, same cameras
    assert cams.azimuths[0] == 0.0
    assert np.abs(cams.poses[0, :3, 3] - [1.5 * math.cos(cams.elevations[0]), 0.0, 1.5 * math.sin(cams.elevations[0])]
                  ).max() <= 0.05 + 1e-6
    other = orbit_cameras(np.random.default_rng(1), n_views=16)
    assert other.azimuths[0] == 0.0 and other.elevations[0] != cams.elevations[0]
    np.testing.assert_array_equal(orbit_cameras(np.random.default_rng(0)).poses, cams.poses)


def test_orbit_cameras_random_start_azimuth():
    zero = orbit_cameras(np.random.default_rng(0), n_views=16)
    spun = orbit_cameras(np.random.default_rng(0), n_views=16, random_start_azimuth=True)
    other = orbit_cameras(np.random.default_rng(1), n_views=16, random_start_azimuth=True)
    assert spun.azimuths[0] != 0.0 and other.azimuths[0] != spun.azimuths[0]
    np.testing.assert_allclose(np.diff(spun.azimuths.astype(np.float64)) % (2 * math.pi), 2 * math.pi / 16, atol=1e-5)
    # the switch moves only the azimuths: same seed, same elevation
    np.testing.assert_array_equal(spun.elevations, zero.elevations)


def test_orbit_elevations_cover_the_range():
    rng = np.random.default_rng(5)
    elevations = np.array([orbit_cameras(rng, n_views=2).elevations[0] for _ in range(200)])
    assert elevations.min() >= 0 and elevations.max() <= math.pi / 4
    assert elevations.min() < 0.1 and elevations.max() > math.pi / 4 - 0.1


def test_random_cameras():
    cams = random_cameras(np.random.default_rng(0), n_views=32)
    assert cams.poses.shape == (32, 4, 4)
    assert (cams.elevations >= -math.pi / 6).all() and (cams.elevations <= math.pi / 3).all()
    assert len(np.unique(cams.elevations)) == 32
    np.testing.assert_allclose(np.linalg.norm(cams.poses[:, :3, 3], axis=1), 1.5, atol=1e-5)
    _check_looks_at_origin(cams.poses)


def test_uniform_cameras():
    cams = uniform_cameras(32, resolution=128)
    assert cams.poses.shape == (32, 4, 4)
    assert cams.intrinsics == Intrinsics(96.0, 96.0, 64.0, 64.0, 128, 128)
    np.testing.assert_array_equal(uniform_cameras(32).poses, cams.poses)
    rings, counts = np.unique(cams.elevations, return_counts=True)
    assert len(rings) == 4 and (counts == 8).all()
    for ring in rings:
        azimuths = np.sort(cams.azimuths[cams.elevations == ring].astype(np.float64))
        np.testing.assert_allclose(np.diff(azimuths), 2 * math.pi / 8, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cams.poses[:, :3, 3], axis=1), 1.5, atol=1e-5)
    _check_looks_at_origin(cams.poses)
    assert len(uniform_cameras(10, elevations=(0.0, 0.5, 1.0))) == 10


@pytest.mark.parametrize("suffix", ["glb", "obj"])
def test_texture_orientation_follows_uv_convention(renderer, tmp_path, suffix):
    """UV (0, 0) is the image's bottom-left: a 2x2 texture lands on the quad the right way up."""
    vertices = np.array([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], dtype=np.float64)
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64)
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
    # image rows top to bottom: red green / blue yellow
    image = Image.fromarray(
        np.array([[colours["red"], colours["green"]], [colours["blue"], colours["yellow"]]], np.uint8)
    )
    material = trimesh.visual.material.SimpleMaterial(image=image, diffuse=(255, 255, 255, 255))
    quad = trimesh.Trimesh(
        vertices, [[0, 1, 2], [0, 2, 3]], visual=trimesh.visual.TextureVisuals(uv, material=material)
    )
    path = tmp_path / f"quad.{suffix}"
    quad.export(path)
    mesh = load_asset(path, up="z")  # built in the +z-up world
    pose = _pose(-math.pi / 2, 0.0)  # looks along +y: world +x is image right, +z is image up
    (rendered,) = renderer.render(mesh, pose[None])
    # quadrant centres of the normalised quad: top-left is red, top-right green, ...
    expected = {"red": (-0.25, 0.25), "green": (0.25, 0.25), "blue": (-0.25, -0.25), "yellow": (0.25, -0.25)}
    for name, (x, z) in expected.items():
        col, row = _project(np.array([[x, 0.0, z]]), pose, renderer.intrinsics)[0].astype(int)
        pixel = rendered[row, col, :3].astype(int)
        assert ((pixel > 40) == (np.array(colours[name]) > 0)).all(), (name, pixel)
