"""Real meshes (tests/fixtures/meshes, see its README) load upright in the +z-up world and render so.

The bunny is a +y-up scan (the default `up="y"`); the aeroplane a +z-up file (`up="z"`, loaded unrotated).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh

from vfusion3d_lightning.cameras import Y_UP_TO_WORLD
from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data.render import MeshRenderer, load_asset
from vfusion3d_lightning.data.schema import complete_shards, read_samples

MESHES = Path(__file__).resolve().parents[1] / "fixtures" / "meshes"
BUNNY, AIRPLANE = MESHES / "bunny.obj", MESHES / "airplane.ply"
DIRECTIONS = {f"{sign}{axis}": (i, s) for i, axis in enumerate("xyz") for s, sign in ((1, "+"), (-1, "-"))}


def _base_share(vertices: np.ndarray, axis: int, sign: int) -> float:
    """The share of vertices in the lowest tenth of the height, were `sign` * `axis` up."""
    height = sign * vertices[:, axis]
    return float(((height - height.min()) < 0.1 * np.ptp(height)).mean())


def _normalised(vertices: np.ndarray) -> np.ndarray:
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - (lo + hi) / 2) / (hi - lo).max()


def _top_to_bottom_width(alpha: np.ndarray) -> float:
    """Silhouette width in its top sixth over that in its bottom sixth: small for a bunny with its ears up."""
    rows = np.flatnonzero(alpha.any(axis=1))
    top, bottom = rows.min(), rows.max()
    band = max(1, (bottom - top + 1) // 6)
    return float(alpha[top:top + band].sum(axis=1).mean() / alpha[bottom - band + 1:bottom + 1].sum(axis=1).mean())


def test_y_up_to_world_is_the_documented_rotation():
    rotation = Y_UP_TO_WORLD[:3, :3]
    np.testing.assert_array_equal(rotation @ [0, 1, 0], [0, 0, 1])  # file up -> world up
    np.testing.assert_array_equal(rotation @ [0, 0, 1], [1, 0, 0])  # glTF front -> the azimuth-0 camera (+x)
    assert np.linalg.det(rotation) == pytest.approx(1.0)  # a rotation, no mirror
    np.testing.assert_array_equal(rotation.T @ rotation, np.eye(3))


def test_bunny_stands_on_its_feet():
    """The bunny sits on a flat base: with the file's +y turned to world +z, the lowest tenth of its height
    holds far more of its vertices than in any other direction (the ears make the top sparse)."""
    raw = trimesh.load(BUNNY, process=False).vertices
    assert _base_share(raw, 1, 1) > 0.15  # in the file, +y is up
    vertices = np.asarray(load_asset(BUNNY).vertices)  # default up="y"
    shares = {name: _base_share(vertices, axis, sign) for name, (axis, sign) in DIRECTIONS.items()}
    assert max(shares, key=shares.get) == "+z"
    assert shares["+z"] > 2 * max(share for name, share in shares.items() if name != "+z")
    # the same mesh read as +z up would lie on its side
    lying = np.asarray(load_asset(BUNNY, up="z").vertices)
    assert _base_share(lying, 2, 1) < 0.1


def test_bunny_glb_loads_like_the_obj(tmp_path):
    """glTF is +y up by its specification: the same vertices in a GLB load to the same world mesh."""
    glb = tmp_path / "bunny.glb"
    glb.write_bytes(trimesh.load(BUNNY, process=False).export(file_type="glb"))
    np.testing.assert_allclose(load_asset(glb).vertices, load_asset(BUNNY).vertices, atol=1e-6)


def test_up_z_loads_unrotated():
    raw = np.asarray(trimesh.load(AIRPLANE, process=False).vertices, dtype=np.float64)
    np.testing.assert_allclose(load_asset(AIRPLANE, up="z").vertices, _normalised(raw), atol=1e-7)
    # the aeroplane is +z up: flat in world xy, its height the smallest extent
    extents = load_asset(AIRPLANE, up="z").extents
    assert extents.argmin() == 2 and extents[2] < 0.3 * extents.max()
    # read as +y up, its wings would stand vertical (seen from above at elevation 0)
    assert load_asset(AIRPLANE).extents.argmin() == 0
    with pytest.raises(ValueError, match="up must be one of"):
        load_asset(AIRPLANE, up="x")


def _render_orbit(tmp_path: Path, mesh: Path, up: str) -> list:
    assets = tmp_path / f"assets-{up}"
    assets.mkdir()
    shutil.copy(mesh, assets / mesh.name)
    out = tmp_path / f"shards-{up}"
    assert main(["render", "--assets", str(assets), "--out", str(out), "--views", "orbit16", "--resolution", "64",
                 "--workers", "1", "--progress", "false", "--up", up]) == 0
    return list(read_samples(complete_shards(out)))


def test_rendered_bunny_orbit_is_upright_and_starts_at_azimuth_0(tmp_path):
    (sample,) = _render_orbit(tmp_path, BUNNY, "y")
    assert sample.extra["up"] == "y"
    assert sample.azimuths[0] == 0.0
    np.testing.assert_allclose(np.diff(sample.azimuths.astype(np.float64)), 2 * math.pi / 16, atol=1e-5)
    assert 0.0 <= sample.elevations[0] <= math.pi / 4
    # the views are of the upright mesh, from the cameras the shard records
    with MeshRenderer(64) as renderer:
        expected = renderer.render(load_asset(BUNNY), sample.cam2world)
        lying = renderer.render(load_asset(BUNNY, up="z"), sample.cam2world)
    assert np.abs(sample.images.astype(int) - expected.astype(int)).max() <= 1
    # ears up: in most views the silhouette is narrower at its top than at its bottom; lying, it is not
    upright = np.median([_top_to_bottom_width(view[..., 3] > 127) for view in sample.images])
    assert upright < 0.8
    assert np.median([_top_to_bottom_width(view[..., 3] > 127) for view in lying]) > 1.0


def _height_over_width(alpha: np.ndarray) -> float:
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    return float((np.ptp(rows) + 1) / (np.ptp(cols) + 1))


def test_rendered_airplane_with_up_z_is_level(tmp_path):
    """`--up z`: a level aeroplane seen from near the horizon is much wider than tall in every view; read as
    +y up, some views look down on its wings."""
    (sample,) = _render_orbit(tmp_path, AIRPLANE, "z")
    assert sample.extra["up"] == "z" and sample.azimuths[0] == 0.0
    assert sample.elevations[0] < 0.2  # what seed 0 gives this key: near the horizon
    with MeshRenderer(64) as renderer:
        expected = renderer.render(load_asset(AIRPLANE, up="z"), sample.cam2world)
        turned = renderer.render(load_asset(AIRPLANE, up="y"), sample.cam2world)
    assert np.abs(sample.images.astype(int) - expected.astype(int)).max() <= 1
    assert max(_height_over_width(view[..., 3] > 127) for view in sample.images) < 0.5
    assert max(_height_over_width(view[..., 3] > 127) for view in turned) > 1.5
