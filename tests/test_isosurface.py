import math

import mcubes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfusion3d_lightning.geometry.isosurface import nearest_vertex_distance, surface_nets


def coords(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, z of grid points linspace(-1, 1, n) per axis, broadcastable to `shape`, indexed [x, y, z]."""
    x, y, z = (torch.linspace(-1, 1, n, dtype=torch.float64) for n in shape)
    return x.view(-1, 1, 1), y.view(1, -1, 1), z.view(1, 1, -1)


def sphere(shape=(64, 64, 64), centre=(0.0, 0.0, 0.0), radius=0.6) -> torch.Tensor:
    x, y, z = coords(shape)
    return radius - ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2).sqrt()


def ellipsoid(shape=(48, 64, 80)) -> torch.Tensor:
    # a non-cubic grid too: catches any mix-up of the three axes' strides
    x, y, z = coords(shape)
    return 1 - ((x - 0.2) / 0.6) ** 2 - ((y + 0.15) / 0.35) ** 2 - ((z - 0.1) / 0.5) ** 2


def two_blobs(shape=(64, 64, 64)) -> torch.Tensor:
    x, y, z = coords(shape)
    first = torch.exp(-((x + 0.45) ** 2 + y**2 + z**2) / 0.1)
    second = torch.exp(-((x - 0.45) ** 2 + (y - 0.1) ** 2 + z**2) / 0.06)
    return first + second - 0.5


def torus(shape=(72, 72, 72)) -> torch.Tensor:
    x, y, z = coords(shape)
    return 0.22 - (((x**2 + y**2).sqrt() - 0.55) ** 2 + z**2).sqrt()


def random_smooth(shape=(48, 48, 48)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(1, 1, 6, 6, 6, generator=generator, dtype=torch.float64)
    return F.interpolate(small, size=shape, mode="trilinear", align_corners=True)[0, 0]


CLOSED = {"sphere": sphere, "ellipsoid": ellipsoid, "two_blobs": two_blobs, "torus": torus}
FIELDS = {**CLOSED, "random_smooth": random_smooth}


def marching_cubes(grid: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    vertices, faces = mcubes.marching_cubes(grid.numpy(), threshold)
    return torch.from_numpy(vertices).float(), torch.from_numpy(faces.astype(np.int64))


def normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unnormalised right-hand face normals (F, 3)."""
    a, b, c = vertices[faces].unbind(1)
    return torch.linalg.cross(b - a, c - a)


def signed_volume(vertices: torch.Tensor, faces: torch.Tensor) -> float:
    """Divergence theorem: the sum over faces of det(a, b, c) / 6 is the enclosed volume for outward faces."""
    a, b, c = vertices[faces].double().unbind(1)
    return (a * torch.linalg.cross(b, c)).sum().item() / 6


@pytest.fixture(scope="module", params=list(FIELDS))
def meshes(request):
    grid = FIELDS[request.param]().float()
    return request.param, grid, surface_nets(grid, 0.0), marching_cubes(grid, 0.0)


def test_vertices_lie_within_a_voxel_of_marching_cubes(meshes):
    name, grid, (vertices, faces), (mc_vertices, mc_faces) = meshes
    assert vertices.dtype == torch.float32 and vertices.shape[1] == 3
    assert faces.dtype == torch.int64 and faces.shape[1] == 3 and len(faces) > 200
    assert faces.min() >= 0 and faces.max() < len(vertices)
    assert torch.equal(torch.unique(faces), torch.arange(len(vertices)))  # no unused vertices
    # Marching cubes' vertices lie on its surface, so the distance to the nearest one bounds the distance to
    # that surface from above: passing this check passes "within a voxel of the surface" too.
    assert nearest_vertex_distance(vertices, mc_vertices, within=2.0).max() < 1.0, name
    # and the other way round: no part of marching cubes' surface is missed, except where it runs into the
    # grid's outer faces: there surface nets stop at the outermost cells' vertices, inside the last cell
    size = torch.tensor(grid.shape) - 1
    away = ((mc_vertices >= 1) & (mc_vertices <= size - 1)).all(dim=1)
    assert nearest_vertex_distance(mc_vertices[away], vertices, within=2.0).max() < 1.0, name
    # both put one vertex per crossed edge (mc) or per cell around one (here): similar counts, a sanity check
    assert 0.5 < len(vertices) / len(mc_vertices) < 2


@pytest.mark.parametrize("name", list(CLOSED))
def test_closed_surfaces_are_watertight_and_consistently_oriented(name):
    vertices, faces = surface_nets(CLOSED[name]().float(), 0.0)
    directed = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, directed_counts = torch.unique(directed, dim=0, return_counts=True)
    assert (directed_counts == 1).all()  # each directed edge once: neighbours wind the same way
    _, counts = torch.unique(directed.sort(dim=1).values, dim=0, return_counts=True)
    assert (counts == 2).all()  # each undirected edge in exactly two faces: closed, no boundary
    assert signed_volume(vertices, faces) > 0  # wound outward, as marching cubes


def test_sphere_faces_point_outward_and_enclose_its_volume():
    n, radius = 64, 0.6
    vertices, faces = surface_nets(sphere((n,) * 3, radius=radius).float(), 0.0)
    centre = torch.full((3,), (n - 1) / 2)
    outward = (normals(vertices, faces) * (vertices[faces].mean(dim=1) - centre)).sum(dim=1)
    assert (outward > 0).all()
    r = radius * (n - 1) / 2  # voxel units
    assert signed_volume(vertices, faces) == pytest.approx(4 / 3 * math.pi * r**3, rel=0.02)
    assert ((vertices - centre).norm(dim=1) - r).abs().max() < 0.5


def test_off_centre_sphere_and_orientation_follow_the_density():
    # a hole of low density in a high-density box: normals point into the hole, where density falls
    n = 40
    field = -sphere((n,) * 3, centre=(0.2, -0.1, 0.05), radius=0.4).float()
    vertices, faces = surface_nets(field, 0.0)
    centre = (torch.tensor([0.2, -0.1, 0.05]) + 1) / 2 * (n - 1)
    assert ((normals(vertices, faces) * (vertices[faces].mean(dim=1) - centre)).sum(dim=1) < 0).all()
    assert signed_volume(vertices, faces) < 0


def test_threshold_convention_matches_marching_cubes():
    # values equal to the threshold are outside, for both: a lone bump of 2 in a field of 1 at threshold 1
    for bump, has_surface in [(2.0, True), (0.0, False), (1.0, False)]:
        grid = torch.ones(5, 5, 5)
        grid[2, 2, 2] = bump
        vertices, faces = surface_nets(grid, 1.0)
        mc_vertices, mc_faces = marching_cubes(grid, 1.0)
        assert (len(faces) > 0) == (len(mc_faces) > 0) == has_surface
        if has_surface:
            assert nearest_vertex_distance(vertices, mc_vertices, within=2.0).max() < 1.0
    # the threshold is compared in the grid's dtype, as mcubes does: float32(0.1) is not above 0.1 here
    grid = torch.zeros(4, 4, 4)
    grid[1:3, 1:3, 1:3] = 0.1
    assert len(surface_nets(grid, 0.1)[1]) == len(marching_cubes(grid, 0.1)[1]) == 0
    assert len(surface_nets(grid, 0.0999)[1]) > 0 and len(marching_cubes(grid, 0.0999)[1]) > 0
    # a wide plateau at the threshold between inside and outside: same inside set, same side of the surface
    x = torch.linspace(-1, 1, 32).view(-1, 1, 1).expand(32, 32, 32)
    grid = torch.where(x.abs() < 0.5, 0.5, torch.where(x < 0, 1.0, 0.0))
    vertices, faces = surface_nets(grid, 0.5)
    mc_vertices, _ = marching_cubes(grid, 0.5)
    assert nearest_vertex_distance(vertices, mc_vertices, within=2.0).max() < 1.0
    assert nearest_vertex_distance(mc_vertices, vertices, within=2.0).max() < 1.0


def test_empty_grid_gives_no_faces():
    for grid in (torch.zeros(8, 8, 8), torch.ones(8, 8, 8), torch.zeros(2, 2, 2)):
        vertices, faces = surface_nets(grid, 0.5)
        assert vertices.shape == (0, 3) and vertices.dtype == torch.float32
        assert faces.shape == (0, 3) and faces.dtype == torch.int64


def test_surface_only_on_the_boundary_gives_no_faces():
    # crossings on the grid's outer edges have no 4 cells around them: nothing to join, and no stray vertices
    grid = torch.zeros(6, 6, 6)
    grid[0, 0, :] = 1.0
    vertices, faces = surface_nets(grid, 0.5)
    assert len(faces) == 0 and len(vertices) == 0


def test_nan_is_outside():
    grid = sphere((32, 32, 32)).float()
    holey = grid.clone()
    holey[grid < -0.3] = float("nan")
    holey[0, :, 5] = float("nan")
    vertices, faces = surface_nets(holey, 0.0)
    expected_vertices, expected_faces = surface_nets(grid, 0.0)
    assert torch.equal(faces, expected_faces) and torch.equal(vertices, expected_vertices)
    # NaN next to a crossing: still a mesh, finite, and the NaN side counts as outside
    grid[16, 16, 16] = float("nan")
    vertices, faces = surface_nets(grid, 0.0)
    assert torch.isfinite(vertices).all() and len(faces) > len(expected_faces)


def test_dtypes_give_the_same_mesh():
    grid = ellipsoid((24, 28, 32))
    vertices, faces = surface_nets(grid.float(), 0.0)
    for other in (grid, grid.half(), grid.bfloat16()):
        v, f = surface_nets(other, 0.0)
        assert v.dtype == torch.float32 and f.dtype == torch.int64
        if other.dtype == torch.float64:
            assert torch.equal(f, faces) and torch.allclose(v, vertices, atol=1e-4)
        else:  # half precision moves crossings slightly but keeps the mesh close
            assert nearest_vertex_distance(v, vertices, within=2.0).max() < 0.5


@pytest.mark.parametrize(
    "grid, threshold, match",
    [
        (torch.zeros(8, 8), 0.5, "3-D"),
        (torch.zeros(8, 1, 8), 0.5, "every side >= 2"),
        (torch.zeros(8, 8, 8, dtype=torch.int32), 0.5, "floating dtype"),
        (torch.zeros(8, 8, 8, dtype=torch.bool), 0.5, "floating dtype"),
        (np.zeros((8, 8, 8)), 0.5, "torch.Tensor"),
        (torch.zeros(8, 8, 8), float("nan"), "finite"),
        (torch.zeros(8, 8, 8), float("inf"), "finite"),
    ],
)
def test_bad_inputs_raise(grid, threshold, match):
    with pytest.raises(ValueError, match=match):
        surface_nets(grid, threshold)


def test_uses_only_torch_ops_on_the_grid_device(monkeypatch):
    # any trip through numpy or the host would go through one of these: forbid them all
    grid = two_blobs((32, 32, 32)).float()
    expected = surface_nets(grid, 0.0)
    for method in ("numpy", "tolist", "item", "cpu"):
        monkeypatch.setattr(torch.Tensor, method, lambda *args, **kwargs: pytest.fail("left the device"))
    vertices, faces = surface_nets(grid, 0.0)
    monkeypatch.undo()
    assert vertices.device == faces.device == grid.device
    assert torch.equal(faces, expected[1]) and torch.equal(vertices, expected[0])
