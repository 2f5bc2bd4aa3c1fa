"""Procedural assets: determinism, variety, and the files `write_assets` writes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from vfusion3d_lightning.data.procedural import (
    FORMATS,
    asset_parts,
    baked_vertex_colors,
    generate_asset,
    in_file_frame,
    pattern_texture,
    write_assets,
)
from vfusion3d_lightning.data.render import load_asset


def _fingerprint(asset) -> str:
    """Hash of everything that makes an asset: geometry, colours, UVs and texture pixels."""
    h = hashlib.sha256()
    for part in asset_parts(asset):
        h.update(np.ascontiguousarray(part.vertices, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(part.faces, dtype=np.int64).tobytes())
        h.update(baked_vertex_colors(part).tobytes())
        if isinstance(part.visual, trimesh.visual.TextureVisuals):
            h.update(np.ascontiguousarray(part.visual.uv, dtype=np.float64).tobytes())
            h.update(part.visual.material.image.tobytes())
    return h.hexdigest()


def _is_textured(part: trimesh.Trimesh) -> bool:
    visual = part.visual
    if not isinstance(visual, trimesh.visual.TextureVisuals) or visual.uv is None:
        return False
    images = (getattr(visual.material, "baseColorTexture", None), getattr(visual.material, "image", None))
    return any(image is not None for image in images)


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_same_seed_gives_identical_asset(seed):
    assert _fingerprint(generate_asset(seed)) == _fingerprint(generate_asset(seed))


def test_different_seeds_differ():
    prints = {_fingerprint(generate_asset(seed)) for seed in range(12)}
    assert len(prints) == 12


def test_assets_are_varied():
    assets = [generate_asset(seed) for seed in range(30)]
    n_parts = [len(asset_parts(a)) for a in assets]
    assert min(n_parts) >= 1 and max(n_parts) <= 5
    assert len(set(n_parts)) >= 3
    parts = [p for a in assets for p in asset_parts(a)]
    textured = [_is_textured(p) for p in parts]
    assert any(textured) and not all(textured)
    # coloured parts: some solid, some gradients
    n_colours = [len(np.unique(p.visual.vertex_colors, axis=0)) for p, t in zip(parts, textured, strict=True) if not t]
    assert min(n_colours) == 1 and max(n_colours) > 10
    # textures show two colours: one light, one dark
    for part in (p for p, t in zip(parts, textured, strict=True) if t):
        pixels = np.asarray(part.visual.material.image).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) == 2
        assert pixels.sum(axis=1).max() - pixels.sum(axis=1).min() > 150


def test_upright_assets_stand_on_a_base_turned_only_about_z():
    for seed in range(8):
        asset = generate_asset(seed, style="upright")
        assert _fingerprint(asset) == _fingerprint(generate_asset(seed, style="upright"))
        base_top = asset.geometry["base"].bounds[1, 2]
        for name in asset.graph.nodes_geometry:
            transform, geometry = asset.graph[name]
            rotation = transform[:3, :3]
            np.testing.assert_allclose(rotation[:, 2], [0, 0, 1], atol=1e-9)  # up stays up
            if name != "base":
                lowest = (asset.geometry[geometry].vertices @ rotation.T + transform[:3, 3])[:, 2].min()
                assert lowest == pytest.approx(base_top, abs=1e-9)
    assert _fingerprint(generate_asset(3, style="upright")) != _fingerprint(generate_asset(3))
    with pytest.raises(ValueError, match="unknown asset style 'sideways'"):
        generate_asset(0, style="sideways")


def test_solid_assets_are_one_upright_primitive_of_one_saturated_colour():
    hues = set()
    for seed in range(12):
        asset = generate_asset(seed, style="solid")
        assert isinstance(asset, trimesh.Trimesh)
        assert _fingerprint(asset) == _fingerprint(generate_asset(seed, style="solid"))
        colours = np.unique(asset.visual.vertex_colors, axis=0)
        assert len(colours) == 1
        rgb = colours[0, :3].astype(float)
        assert rgb.max() >= 0.6 * 255 - 1 and (rgb.max() - rgb.min()) >= 0.6 * rgb.max() - 1  # value, saturation
        hues.add(int(rgb.argmax()))
    assert hues == {0, 1, 2}  # red-, green- and blue-dominant colours all occur


def test_pattern_texture():
    checker = np.asarray(pattern_texture("checker", 2, (255, 255, 255), (0, 0, 0), size=4))
    assert checker[:, :, 0].tolist() == [[255, 255, 0, 0], [255, 255, 0, 0], [0, 0, 255, 255], [0, 0, 255, 255]]
    stripes = np.asarray(pattern_texture("stripes", 4, (255, 0, 0), (0, 0, 255), size=4))
    assert stripes[0, :, 0].tolist() == [255, 0, 255, 0] and (stripes[0] == stripes[3]).all()
    with pytest.raises(ValueError, match="pattern"):
        pattern_texture("dots", 2, (255, 255, 255), (0, 0, 0))


def test_write_assets_writes_loadable_files(tmp_path):
    paths = write_assets(tmp_path, 6, seed=0, progress=False)
    assert [p.name for p in paths] == [f"asset_{i:06d}.{FORMATS[i % 3]}" for i in range(6)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    for i, path in enumerate(paths):
        source = asset_parts(generate_asset(i))
        loaded = [g for g in trimesh.load(path, force="scene", process=False).dump(concatenate=False)]
        assert sum(len(g.faces) for g in loaded) == sum(len(p.faces) for p in source)
        bounds = np.array([g.bounds for g in loaded])
        # files are +y up: world (x, y, z) is file (z, x, y)
        source_bounds = np.array([p.bounds for p in source])[:, :, [1, 2, 0]]
        np.testing.assert_allclose(
            [bounds[:, 0].min(0), bounds[:, 1].max(0)],
            [source_bounds[:, 0].min(0), source_bounds[:, 1].max(0)],
            atol=1e-4,
        )
        if path.suffix == ".ply":
            # PLY has no textures: they are baked into the vertex colours
            (mesh,) = loaded
            assert mesh.visual.kind == "vertex"
            expected = np.concatenate([baked_vertex_colors(p) for p in source])
            np.testing.assert_array_equal(mesh.visual.vertex_colors, expected)
        else:
            # glb and obj keep the textures part by part and the vertex colours (obj reads all its
            # colour-only parts back as one mesh)
            assert sum(map(_is_textured, loaded)) == sum(map(_is_textured, source))
            assert all(map(_is_textured, loaded)) == all(map(_is_textured, source))
            for g in loaded:
                assert _is_textured(g) or g.visual.kind == "vertex"
    obj_files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("asset_000001"))
    assert "asset_000001.mtl" in obj_files and any(n.endswith(".png") for n in obj_files)


def test_files_are_y_up_and_load_back_as_generated(tmp_path):
    """Upright assets stand along world +z; their files along +y; `load_asset` (up="y") undoes the turn exactly."""
    asset = generate_asset(2, style="upright")
    turned = in_file_frame(asset)
    world = np.concatenate([p.vertices for p in asset_parts(asset)])
    file = np.concatenate([p.vertices for p in asset_parts(turned)])
    np.testing.assert_array_equal(file, world[:, [1, 2, 0]])
    assert np.ptp(world[:, 2]) == np.ptp(file[:, 1])  # height along world z, file y
    lo, hi = world.min(axis=0), world.max(axis=0)
    expected = (world - (lo + hi) / 2) / (hi - lo).max()
    for fmt in FORMATS:
        (path,) = write_assets(tmp_path / fmt, 1, seed=2, formats=(fmt,), style="upright", progress=False)
        loaded = load_asset(path)
        assert len(loaded.vertices) == len(expected)
        # the files round vertices (glb: float32, obj: 6 decimals)
        np.testing.assert_allclose(loaded.bounds, [expected.min(axis=0), expected.max(axis=0)], atol=1e-5)
        # the same points, whatever order the reader gives the parts in
        assert cKDTree(expected).query(loaded.vertices)[0].max() < 1e-5
        assert cKDTree(loaded.vertices).query(expected)[0].max() < 1e-5


def test_write_assets_resumes_without_rewriting(tmp_path):
    first = write_assets(tmp_path, 3, progress=False)
    first[0].write_bytes(b"kept")  # a rewrite would replace this with a real GLB
    mtimes = {p: p.stat().st_mtime_ns for p in first[1:]}
    second = write_assets(tmp_path, 5, progress=False)
    assert second[:3] == first
    assert first[0].read_bytes() == b"kept"
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert all(p.exists() for p in second)


def test_write_assets_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        write_assets(tmp_path, 1, formats=("stl",), progress=False)
