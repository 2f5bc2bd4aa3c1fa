"""UV-textured meshes: decimation, the per-face and xatlas unwraps, UV rasterisation, baking the triplane's colour,
dilation, normals, export."""

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from vfusion3d_lightning.cameras import Y_UP_TO_WORLD
from vfusion3d_lightning.geometry.mesh import export_mesh, extract_mesh
from vfusion3d_lightning.geometry.texture import (
    MIN_CELL,
    bake_texture,
    decimate,
    dilate,
    face_atlas,
    face_capacity,
    field_colour,
    rasterise,
    sample_texture,
    unwrap_xatlas,
)
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.analytic import write_sphere


def wavy(points) -> torch.Tensor:
    """A colour field with detail on the scale of a few texels, never black: 0.1 to 0.9."""
    points = torch.as_tensor(points, dtype=torch.float32)
    return 0.5 + 0.4 * torch.sin(6 * points + torch.tensor([0.0, 1.0, 2.0], device=points.device))


def surface_error(textured, colour=wavy, count=20_000) -> np.ndarray:
    """|texture - field| at `count` random points of random faces (not only at vertices), bilinear lookups."""
    rng = np.random.default_rng(0)
    face = rng.integers(0, len(textured.faces), count)
    weights = rng.dirichlet([1, 1, 1], count)
    points = np.einsum("nk,nkd->nd", weights, textured.vertices[textured.faces[face]])
    uv = np.einsum("nk,nkd->nd", weights, textured.visual.uv[textured.faces[face]])
    image = np.asarray(textured.visual.material.baseColorTexture) / 255
    return np.abs(sample_texture(image, uv) - colour(points).numpy())


@pytest.fixture(scope="module")
def sphere():
    return trimesh.creation.icosphere(subdivisions=5, radius=0.5)  # 20480 faces


@pytest.fixture(scope="module")
def field():
    """A tiny LRM holding a sphere of radius 0.5 whose colour varies strongly over its surface."""
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny")).eval()
    planes = write_sphere(model, radius=0.5)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        planes[:, :, 2:] = torch.randn(planes[:, :, 2:].shape, generator=generator)
        # rows 1.. of each layer never feed the density (row 0), so the surface stays where it is
        for layer in model.decoder.layers:
            layer.weight[1:] = torch.randn(layer.weight[1:].shape, generator=generator) * 0.5
    return model, planes


def test_decimate_keeps_the_surface_within_the_face_budget(sphere):
    vertices, faces = (t.numpy() for t in decimate(sphere.vertices, sphere.faces, 3000))
    assert 1000 < len(faces) <= 3000
    assert np.abs(np.linalg.norm(vertices, axis=1) - 0.5).max() < 0.02  # cluster means stay near the sphere
    assert faces.max() == len(vertices) - 1 and len(np.unique(faces)) == len(vertices)  # no unused vertices
    decimated = trimesh.Trimesh(vertices, faces, process=False)
    assert abs(decimated.area - sphere.area) / sphere.area < 0.05
    # same winding: normals still point out
    assert (np.einsum("ij,ij->i", decimated.face_normals, decimated.triangles_center) > 0).mean() > 0.99
    same_vertices, same_faces = decimate(sphere.vertices, sphere.faces, len(sphere.faces))
    assert np.array_equal(same_faces.numpy(), sphere.faces)


def test_rasterised_texels_lie_in_their_triangles(sphere):
    size = 128
    vmapping, faces, uv = unwrap_xatlas(sphere.vertices, sphere.faces, size)
    assert uv.min() >= 0 and uv.max() <= 1 and len(vmapping) == len(uv)
    face, bary = rasterise(uv, faces, size)
    rows, cols = np.nonzero(face >= 0)
    centres = np.stack([(cols + 0.5) / size, 1 - (rows + 0.5) / size], 1)
    rebuilt = np.einsum("nk,nkd->nd", bary[rows, cols], uv[faces[face[rows, cols]]])
    assert np.abs(rebuilt - centres).max() < 1e-5  # each texel centre is where its barycentrics say
    assert (bary[rows, cols] >= -1e-5).all()
    # covered texels ~ the charts' area in texels (coverage differs only along chart edges)
    d1, d2 = uv[faces[:, 1]] - uv[faces[:, 0]], uv[faces[:, 2]] - uv[faces[:, 0]]
    area = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]).sum() / 2
    assert abs(len(rows) - area * size**2) < 0.1 * area * size**2


@pytest.mark.parametrize("unwrap", ["per_face", "xatlas"])
def test_the_texture_at_each_vertex_matches_the_field_there(sphere, unwrap):
    textured = bake_texture(wavy, sphere, size=512, max_faces=10_000, unwrap=unwrap)
    image = np.asarray(textured.visual.material.baseColorTexture) / 255
    error = np.abs(sample_texture(image, textured.visual.uv) - wavy(textured.vertices).numpy())
    # bound: mean < 0.01, 95th percentile < 0.02 (8-bit rounding is 0.002; vertices on chart borders see
    # dilated texels)
    assert error.mean() < 0.01 and np.percentile(error, 95) < 0.02, (error.mean(), np.percentile(error, 95))


@pytest.mark.parametrize("unwrap", ["per_face", "xatlas"])
def test_the_baked_texture_matches_the_meshs_vertex_colours(field, tmp_path, unwrap):
    model, planes = field
    mesh = extract_mesh(model, planes, resolution=48, threshold=1.0)  # vertex colours queried at the vertices
    assert mesh.visual.vertex_colors[:, :3].std() > 20  # a field with colour to get wrong
    textured = bake_texture(field_colour(model, planes), mesh, size=512, max_faces=len(mesh.faces), unwrap=unwrap)
    assert len(textured.faces) == len(mesh.faces)  # within the budget: not decimated
    colour_of = {tuple(v): c for v, c in zip(mesh.vertices.round(6), mesh.visual.vertex_colors[:, :3] / 255)}
    expected = np.stack([colour_of[tuple(v)] for v in textured.vertices.round(6)])
    image = np.asarray(textured.visual.material.baseColorTexture) / 255
    error = np.abs(sample_texture(image, textured.visual.uv) - expected)
    # the vertex colours truncate to 8 bits (up to 1/255 low); same bound as for the analytic field
    assert error.mean() < 0.01 and np.percentile(error, 95) < 0.02, (error.mean(), np.percentile(error, 95))
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp_path / "texture.png")


def test_dilation_leaves_no_background_next_to_charts(sphere):
    size = 256
    textured = bake_texture(wavy, sphere, size=size, max_faces=5000, unwrap="xatlas")
    image = np.asarray(textured.visual.material.baseColorTexture) / 255
    face, _ = rasterise(textured.visual.uv, textured.faces, size)
    chart = torch.from_numpy(face >= 0).float()[None, None]
    near = torch.nn.functional.max_pool2d(chart, 5, 1, padding=2)[0, 0].numpy() > 0
    border = near & (face < 0)  # within 2 texels of a chart, outside it
    assert border.sum() > 1000
    assert image[border].min() > 0.05  # the field's range is [0.1, 0.9]: nothing left black
    # each border texel carries its chart's colour: close to the mean of the chart texels within 2 texels
    colour = torch.from_numpy(image).permute(2, 0, 1)[:, None].float() * chart
    total = torch.nn.functional.avg_pool2d(colour, 5, 1, padding=2)[:, 0].permute(1, 2, 0).numpy()
    count = torch.nn.functional.avg_pool2d(chart, 5, 1, padding=2)[0, 0].numpy()
    mean = total[border] / count[border][:, None]
    assert np.abs(image[border] - mean).mean() < 0.05
    assert image.min() > 0.05  # far from every chart: the charts' mean colour, not black


def test_dilate_spreads_one_texel_a_round_then_fills_with_the_mean():
    image = torch.zeros(9, 9, 3)
    mask = torch.zeros(9, 9, dtype=torch.bool)
    image[4, 4], mask[4, 4] = torch.tensor([1.0, 0.5, 0.25]), True
    image[0, 0], mask[0, 0] = torch.tensor([0.0, 0.5, 0.75]), True
    out = dilate(image, mask, iterations=1)
    assert torch.equal(out[3, 3], image[4, 4]) and torch.equal(out[1, 1], image[0, 0])
    assert torch.allclose(out[8, 8], torch.tensor([0.5, 0.5, 0.5]))  # unreached: the mean of the valid texels
    assert torch.equal(dilate(image, mask, iterations=8)[8, 8], image[4, 4])


@pytest.mark.parametrize("suffix, unwrap", [(".glb", "per_face"), (".glb", "xatlas"), (".obj", "per_face")])
def test_textured_meshes_export_and_load_back(sphere, tmp_path, suffix, unwrap):
    textured = bake_texture(wavy, sphere, size=256, max_faces=4000, unwrap=unwrap)
    path = export_mesh(textured, tmp_path / f"mesh{suffix}")
    if suffix == ".obj":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.mtl", "mesh.obj", "mesh.png"]
        assert "Kd 1.0" in (tmp_path / "mesh.mtl").read_text()  # viewers multiply the texture by Kd
    loaded = trimesh.load(path, force="mesh").apply_transform(Y_UP_TO_WORLD)  # the file is +y up
    material = loaded.visual.material
    picture = material.baseColorTexture if suffix == ".glb" else material.image
    assert picture.size == (256, 256) and loaded.visual.uv.shape == (len(loaded.vertices), 2)
    assert len(loaded.faces) == len(textured.faces)
    image = np.asarray(picture.convert("RGB")) / 255
    error = np.abs(sample_texture(image, loaded.visual.uv) - wavy(loaded.vertices).numpy())
    assert np.percentile(error, 95) < 0.05  # UVs and image survive the round trip the right way up
    # trimesh's own lookup (nearest texel, its v-up convention) agrees: the texture is not upside down for it
    theirs = trimesh.visual.color.uv_to_color(loaded.visual.uv, picture)[:, :3] / 255
    assert np.median(np.abs(theirs - wavy(loaded.vertices).numpy())) < 0.05
    if suffix == ".glb":  # smooth normals travel with the file: on a sphere, the radial direction
        stored = next(iter(trimesh.load(path, process=False).geometry.values()))  # force="mesh" recomputes them
        radial = stored.vertices / np.linalg.norm(stored.vertices, axis=1, keepdims=True)
        assert (np.einsum("ij,ij->i", stored.vertex_normals, radial) > 0.99).mean() > 0.99  # decimation flips a few
        corner_normals = stored.vertex_normals[stored.faces]
        assert (np.abs(corner_normals[:, 0] - corner_normals[:, 1]).max(1) > 1e-3).mean() > 0.9  # not flat faces


def test_bake_rejects_a_tiny_texture(sphere):
    with pytest.raises(ValueError, match="texture size must be >= 8"):
        bake_texture(wavy, sphere, size=4)


def test_no_bilinear_lookup_inside_a_face_reads_another_faces_texels():
    """The per-face layout's promise: from any point of a face's UV triangle, the four texels a bilinear lookup
    reads are baked from that face, and lie in its cell."""
    count, size = 10, 64
    corners, slots, cell, per_row = face_atlas(count, size)
    assert cell >= MIN_CELL and per_row == 3
    rng = np.random.default_rng(0)
    weights = rng.dirichlet([1, 1, 1], 4000)
    weights[:30] = np.eye(3)[np.arange(30) % 3]  # the corners, where lookups reach farthest
    texel_sum = np.add.outer(np.arange(cell), np.arange(cell)) + 1  # centre x + centre y of each texel
    for face in range(count):
        points = weights @ corners[face].numpy()  # (x, y) pixel coordinates
        origin = np.array([face // 2 % per_row, face // 2 // per_row]) * cell
        for dx in (0, 1):
            for dy in (0, 1):
                x = np.floor(points[:, 0] - 0.5).astype(int) + dx - origin[0]
                y = np.floor(points[:, 1] - 0.5).astype(int) + dy - origin[1]
                assert ((0 <= x) & (x < cell) & (0 <= y) & (y < cell)).all(), face
                owner = (texel_sum[y, x] > cell).astype(int)
                assert (owner == face % 2).all(), face


def test_per_face_texture_matches_the_field_across_faces_as_xatlas_does(sphere):
    """At random surface points (inside faces, not only at vertices), per-face texels reproduce the field as
    well as xatlas charts on average and better at the worst point (no chart borders)."""
    errors = {unwrap: surface_error(bake_texture(wavy, sphere, size=512, max_faces=10_000, unwrap=unwrap))
              for unwrap in ("per_face", "xatlas")}
    assert errors["per_face"].mean() < 0.002 and errors["per_face"].max() < 0.02, errors["per_face"].max()
    assert errors["per_face"].mean() < 2 * errors["xatlas"].mean()


def test_per_face_unwrap_decimates_to_what_the_texture_holds_and_says_so(sphere):
    lines = []
    textured = bake_texture(wavy, sphere, size=64, max_faces=1000, log=lines.append)
    assert face_capacity(64) == 288 and 100 < len(textured.faces) <= 288  # clustering undershoots
    assert lines == [f"decimated 20480 -> {len(textured.faces)} faces (--max_faces 1000; a 64^2 texture holds 288 "
                     "in the per-face unwrap)"]
    with pytest.raises(ValueError, match=r"a 64\^2 texture holds at most 288 faces.*raise the texture size"):
        face_atlas(289, 64)


def test_a_mesh_to_be_textured_skips_its_vertex_colours_and_keeps_its_surface(field):
    model, planes = field
    coloured = extract_mesh(model, planes, resolution=32, threshold=1.0)
    plain = extract_mesh(model, planes, resolution=32, threshold=1.0, vertex_colours=False)
    assert np.array_equal(plain.vertices, coloured.vertices) and np.array_equal(plain.faces, coloured.faces)
    assert coloured.visual.kind == "vertex" and plain.visual.kind is None
