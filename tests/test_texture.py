"""UV-textured meshes: decimation, xatlas unwrap, UV rasterisation, baking the triplane's colour, dilation, export."""

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from vfusion3d_lightning.cameras import Y_UP_TO_WORLD
from vfusion3d_lightning.geometry.mesh import export_mesh, extract_mesh
from vfusion3d_lightning.geometry.texture import (
    bake_texture,
    decimate,
    dilate,
    field_colour,
    rasterise,
    sample_texture,
    unwrap,
)
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.analytic import write_sphere


def wavy(points) -> torch.Tensor:
    """A colour field with detail on the scale of a few texels, never black: 0.1 to 0.9."""
    points = torch.as_tensor(points, dtype=torch.float32)
    return 0.5 + 0.4 * torch.sin(6 * points + torch.tensor([0.0, 1.0, 2.0]))


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
    vertices, faces = decimate(sphere.vertices, sphere.faces, 3000)
    assert 1000 < len(faces) <= 3000
    assert np.abs(np.linalg.norm(vertices, axis=1) - 0.5).max() < 0.02  # cluster means stay near the sphere
    assert faces.max() == len(vertices) - 1 and len(np.unique(faces)) == len(vertices)  # no unused vertices
    decimated = trimesh.Trimesh(vertices, faces, process=False)
    assert abs(decimated.area - sphere.area) / sphere.area < 0.05
    # same winding: normals still point out
    assert (np.einsum("ij,ij->i", decimated.face_normals, decimated.triangles_center) > 0).mean() > 0.99
    same_vertices, same_faces = decimate(sphere.vertices, sphere.faces, len(sphere.faces))
    assert np.array_equal(same_faces, sphere.faces)


def test_rasterised_texels_lie_in_their_triangles(sphere):
    size = 128
    vmapping, faces, uv = unwrap(sphere.vertices, sphere.faces, size)
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


def test_the_texture_at_each_vertex_matches_the_field_there(sphere, tmp_path):
    textured = bake_texture(wavy, sphere, size=512, max_faces=10_000)
    image = np.asarray(textured.visual.material.baseColorTexture) / 255
    error = np.abs(sample_texture(image, textured.visual.uv) - wavy(textured.vertices).numpy())
    # bound: mean < 0.01, 95th percentile < 0.02 (8-bit rounding is 0.002; vertices on chart borders see
    # dilated texels)
    assert error.mean() < 0.01 and np.percentile(error, 95) < 0.02, (error.mean(), np.percentile(error, 95))


def test_the_baked_texture_matches_the_meshs_vertex_colours(field, tmp_path):
    model, planes = field
    mesh = extract_mesh(model, planes, resolution=48, threshold=1.0)  # vertex colours queried at the vertices
    assert mesh.visual.vertex_colors[:, :3].std() > 20  # a field with colour to get wrong
    textured = bake_texture(field_colour(model, planes), mesh, size=512, max_faces=len(mesh.faces))
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
    textured = bake_texture(wavy, sphere, size=size, max_faces=5000)
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


@pytest.mark.parametrize("suffix", [".glb", ".obj"])
def test_textured_meshes_export_and_load_back(sphere, tmp_path, suffix):
    textured = bake_texture(wavy, sphere, size=128, max_faces=4000)
    path = export_mesh(textured, tmp_path / f"mesh{suffix}")
    if suffix == ".obj":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.mtl", "mesh.obj", "mesh.png"]
        assert "Kd 1.0" in (tmp_path / "mesh.mtl").read_text()  # viewers multiply the texture by Kd
    loaded = trimesh.load(path, force="mesh").apply_transform(Y_UP_TO_WORLD)  # the file is +y up
    material = loaded.visual.material
    picture = material.baseColorTexture if suffix == ".glb" else material.image
    assert picture.size == (128, 128) and loaded.visual.uv.shape == (len(loaded.vertices), 2)
    assert len(loaded.faces) == len(textured.faces)
    image = np.asarray(picture.convert("RGB")) / 255
    error = np.abs(sample_texture(image, loaded.visual.uv) - wavy(loaded.vertices).numpy())
    assert np.percentile(error, 95) < 0.05  # UVs and image survive the round trip the right way up
    # trimesh's own lookup (nearest texel, its v-up convention) agrees: the texture is not upside down for it
    theirs = trimesh.visual.color.uv_to_color(loaded.visual.uv, picture)[:, :3] / 255
    assert np.median(np.abs(theirs - wavy(loaded.vertices).numpy())) < 0.05


def test_bake_rejects_a_tiny_texture(sphere):
    with pytest.raises(ValueError, match="texture size must be >= 8"):
        bake_texture(wavy, sphere, size=4)
