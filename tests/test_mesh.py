import math
import re

import numpy as np
import pytest
import torch
import trimesh

from vfusion3d_lightning.cameras import Y_UP_TO_WORLD
from vfusion3d_lightning.geometry.isosurface import nearest_vertex_distance
from vfusion3d_lightning.geometry.mesh import (
    SURFACES,
    NoSurfaceError,
    coarse_to_fine_grid,
    density_grid,
    export_mesh,
    extract_mesh,
)
from vfusion3d_lightning.models.lrm import LRM, LRMConfig

RADIUS = 0.5
THRESHOLD = 1.0
PLANE_RES = 128
SLOPE = 20.0  # raw density per unit of r^2: a steep but smooth crossing


def logit_of(colour: float) -> float:
    """Inverse of the decoder's sigmoid(x) * 1.002 - 0.001."""
    return math.log((colour + 0.001) / (1.001 - colour))


def sphere_model(rgb=(1.0, 0.0, 0.0)) -> tuple[LRM, torch.Tensor]:
    """A tiny LRM and planes whose activated density is softplus(SLOPE * (R^2 - r^2) + log(e - 1)):
    it equals THRESHOLD exactly on the sphere |p| = RADIUS. Colour is constant `rgb`."""
    model = LRM(LRMConfig.from_name("tiny")).eval()
    c = model.config.triplane_dim
    ramp = (torch.arange(PLANE_RES) + 0.5) / PLANE_RES * 2 - 1  # pixel centres, align_corners=False
    u = ramp.view(1, PLANE_RES).expand(PLANE_RES, PLANE_RES)  # plane's first coordinate (width)
    v = ramp.view(PLANE_RES, 1).expand(PLANE_RES, PLANE_RES)  # second coordinate (height)
    planes = torch.zeros(1, 3, c, PLANE_RES, PLANE_RES)
    planes[0, 0, 0] = u**2  # XY plane: x^2
    planes[0, 0, 1] = v**2  # XY plane: y^2
    planes[0, 1, 1] = v**2  # XZ plane: z^2
    # triplane features are plane-major: XY channels 0..c-1, XZ channels c..2c-1, ZY 2c..3c-1
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        first, *middle, last = model.decoder.layers
        first.weight[0, [0, 1, c + 1]] = 1.0  # hidden unit 0 = relu(x^2 + y^2 + z^2) = r^2
        for layer in middle:
            layer.weight[0, 0] = 1.0  # pass r^2 through the ReLUs unchanged
        # raw sigma - 1 = SLOPE * (R^2 - r^2) + log(e - 1), so softplus gives 1 on the sphere
        last.weight[0, 0] = -SLOPE
        last.bias[0] = 1.0 + SLOPE * RADIUS**2 + math.log(math.e - 1)
        last.bias[1:] = torch.tensor([logit_of(x) for x in rgb])
    return model, planes


@pytest.fixture(scope="module")
def sphere():
    return sphere_model()


def test_density_grid_matches_the_sphere_field(sphere):
    model, planes = sphere
    grid = density_grid(model, planes, resolution=17, chunk=1000)  # several chunks
    xs = torch.linspace(-1, 1, 17)
    r2 = xs.view(-1, 1, 1) ** 2 + xs.view(1, -1, 1) ** 2 + xs.view(1, 1, -1) ** 2
    expected = torch.nn.functional.softplus(SLOPE * (RADIUS**2 - r2) + math.log(math.e - 1))
    inside = (xs.abs() < 0.95)  # away from the planes' zero-padded border
    box = inside.view(-1, 1, 1) & inside.view(1, -1, 1) & inside.view(1, 1, -1)
    assert grid.shape == (17, 17, 17) and grid.dtype == torch.float32
    assert torch.allclose(grid[box], expected[box], rtol=1e-2, atol=1e-3)
    # [x, y, z] indexing: an asymmetric probe point lands where expected
    density, _ = model.query(planes, torch.tensor([[[xs[3], xs[8], xs[12]]]]))
    assert torch.allclose(grid[3, 8, 12], density[0, 0, 0])


@pytest.mark.parametrize("surface", SURFACES)
def test_sphere_mesh_vertices_lie_on_the_sphere_and_are_red(sphere, surface):
    model, planes = sphere
    resolution = 48
    mesh = extract_mesh(model, planes, resolution=resolution, threshold=THRESHOLD, surface=surface)
    assert len(mesh.faces) > 500
    radii = np.linalg.norm(mesh.vertices, axis=1)
    cell = 2 / (resolution - 1)
    assert np.abs(radii - RADIUS).max() < 2 * cell
    # both interpolate a smooth field along grid edges: far better than a cell on average
    assert np.abs(radii - RADIUS).mean() < 0.1 * cell
    # outward faces, as marching cubes makes them (trimesh's volume is signed)
    assert np.all(np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center) > 0)
    assert mesh.is_watertight
    assert abs(mesh.volume - 4 / 3 * math.pi * RADIUS**3) < 0.05 * 4 / 3 * math.pi * RADIUS**3
    colours = np.asarray(mesh.visual.vertex_colors)
    assert colours.shape == (len(mesh.vertices), 4) and colours.dtype == np.uint8
    assert (colours == [255, 0, 0, 255]).all()


def test_vertex_colours_follow_the_field():
    model, planes = sphere_model(rgb=(0.0, 0.5, 1.0))
    mesh = extract_mesh(model, planes, resolution=24)
    colours = np.asarray(mesh.visual.vertex_colors)
    assert (colours[:, 0] == 0).all() and (colours[:, 2] == 255).all() and (colours[:, 3] == 255).all()
    assert (np.abs(colours[:, 1].astype(int) - 127) <= 1).all()


@pytest.mark.parametrize("coarse, max_fraction", [(None, 0.4), (17, 0.3), (9, 0.6)])
def test_coarse_to_fine_gives_the_dense_mesh(sphere, coarse, max_fraction):
    model, planes = sphere
    resolution = 64
    dense = density_grid(model, planes, resolution)
    grid, fraction = coarse_to_fine_grid(model, planes, resolution, coarse=coarse, threshold=THRESHOLD)
    assert grid.shape == dense.shape
    assert fraction < max_fraction
    # same side of the threshold everywhere, and exact where the surface is decided
    assert torch.equal(grid > THRESHOLD, dense > THRESHOLD)
    near = (dense - THRESHOLD).abs() < 0.5
    assert torch.equal(grid[near], dense[near])
    import mcubes

    v_dense, f_dense = mcubes.marching_cubes(dense.numpy(), THRESHOLD)
    v_fast, f_fast = mcubes.marching_cubes(grid.numpy(), THRESHOLD)
    assert np.array_equal(f_dense, f_fast)
    assert np.allclose(v_dense, v_fast, atol=1e-6)
    # and through extract_mesh's default surface nets (marching cubes is compared directly above)
    mesh_dense = extract_mesh(model, planes, resolution, THRESHOLD, method="dense")
    mesh_fast = extract_mesh(model, planes, resolution, THRESHOLD, method="coarse_to_fine")
    assert np.array_equal(mesh_dense.faces, mesh_fast.faces)
    assert np.allclose(mesh_dense.vertices, mesh_fast.vertices, atol=1e-6)


def test_marching_cubes_surface_is_the_released_mcubes_mesh(sphere):
    model, planes = sphere
    import mcubes

    vertices, faces = mcubes.marching_cubes(density_grid(model, planes, 24).numpy(), THRESHOLD)
    mesh = extract_mesh(model, planes, 24, THRESHOLD, surface="marching_cubes")
    assert np.array_equal(mesh.faces, faces)
    assert np.array_equal(mesh.vertices, vertices / 23 * 2 - 1)


def test_surface_nets_mesh_is_within_a_voxel_of_marching_cubes(sphere):
    model, planes = sphere
    resolution = 40
    nets = extract_mesh(model, planes, resolution, THRESHOLD)  # the default surface
    cubes = extract_mesh(model, planes, resolution, THRESHOLD, surface="marching_cubes")
    cell = 2 / (resolution - 1)
    # the nearest marching-cubes vertex is on its surface, so this bounds the distance to that surface
    nearest = nearest_vertex_distance(torch.as_tensor(nets.vertices), torch.as_tensor(cubes.vertices))
    assert nearest.max() < cell
    back = nearest_vertex_distance(torch.as_tensor(cubes.vertices), torch.as_tensor(nets.vertices))
    assert back.max() < cell
    assert nets.is_watertight and nets.is_winding_consistent
    assert nets.volume == pytest.approx(cubes.volume, rel=0.02)
    assert np.asarray(nets.visual.vertex_colors).shape == (len(nets.vertices), 4)


def test_coarse_to_fine_evaluates_nothing_fine_far_from_an_empty_surface():
    model, planes = sphere_model()
    with torch.no_grad():
        model.decoder.layers[-1].bias[0] = -30.0  # density ~ 0 everywhere
    grid, fraction = coarse_to_fine_grid(model, planes, resolution=33, coarse=9)
    assert fraction == pytest.approx(9**3 / 33**3)
    assert grid.max() < 1e-6


@pytest.mark.parametrize("suffix", [".glb", ".obj", ".ply"])
def test_export_round_trips(sphere, tmp_path, suffix):
    model, planes = sphere
    mesh = extract_mesh(model, planes, resolution=24)
    path = export_mesh(mesh, tmp_path / "sub" / f"sphere{suffix}")
    assert path.exists() and sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp left over
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.faces) == len(mesh.faces)
    # +y up in the file, as viewers and `render` read it: turned back into the world, the same place
    back = loaded.copy().apply_transform(Y_UP_TO_WORLD)
    assert np.allclose(back.bounds, mesh.bounds, atol=1e-5)
    if suffix in (".glb", ".ply"):
        colours = np.asarray(loaded.visual.vertex_colors)
        assert len(colours) == len(loaded.vertices)
        assert (colours[:, :3] == [255, 0, 0]).all()


def test_export_rejects_unknown_suffix(sphere, tmp_path):
    model, planes = sphere
    mesh = extract_mesh(model, planes, resolution=16)
    with pytest.raises(ValueError, match=r"\.glb.*\.obj.*\.ply"):
        export_mesh(mesh, tmp_path / "sphere.stl")
    assert not any(tmp_path.iterdir())


def test_empty_field_raises_with_threshold_and_range():
    model, planes = sphere_model()
    with torch.no_grad():
        model.decoder.layers[-1].weight.zero_()
        model.decoder.layers[-1].bias[0] = -200.0  # softplus(-201) == 0 in float32
    for method in ("dense", "coarse_to_fine"):
        for surface in SURFACES:
            with pytest.raises(ValueError, match=r"threshold 2\.5.*\[0, 0\]"):
                extract_mesh(model, planes, resolution=16, threshold=2.5, method=method, surface=surface)


def test_no_surface_suggests_a_threshold_that_has_one():
    model, planes = sphere_model()
    with pytest.raises(NoSurfaceError, match=r"e\.g\. (\S+) \(its 95th percentile\)") as caught:
        extract_mesh(model, planes, resolution=16, threshold=1e9)
    suggested = float(re.search(r"e\.g\. (\S+) ", str(caught.value)).group(1))
    assert len(extract_mesh(model, planes, resolution=16, threshold=suggested).faces) > 0


def test_bad_arguments_raise():
    model, planes = sphere_model()
    with pytest.raises(ValueError, match="method"):
        extract_mesh(model, planes, resolution=16, method="fast")
    with pytest.raises(ValueError, match=r"isosurface.*'surface_nets', 'marching_cubes'"):
        extract_mesh(model, planes, resolution=16, surface="dual_contouring")
    with pytest.raises(ValueError, match="one triplane"):
        density_grid(model, planes.expand(2, -1, -1, -1, -1), resolution=8)
