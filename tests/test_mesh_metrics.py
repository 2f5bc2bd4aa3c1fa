"""Geometry metrics: Chamfer distance and F-score after normalisation and alignment, and `mesh-metrics`."""

import json
import sys

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from vfusion3d_lightning.cli import console_main, main
from vfusion3d_lightning.geometry.metrics import MeshLoadError, load_mesh, mesh_metrics, search_rotations


def _asymmetric() -> trimesh.Trimesh:
    """A box with distinct sides and a cylinder off every axis: no rotation but the identity maps it onto
    itself, so the rotation that aligns a copy is unique."""
    cylinder = trimesh.creation.cylinder(radius=0.15, height=0.5)
    cylinder.apply_translation((0.4, 0.2, 0.1))
    return trimesh.util.concatenate([trimesh.creation.box((1.0, 0.6, 0.3)), cylinder])


def _moved(mesh: trimesh.Trimesh, rotation: np.ndarray, scale: float = 2.5, shift=(3.0, -1.0, 2.0)):
    transform = np.eye(4)
    transform[:3, :3], transform[:3, 3] = scale * rotation, shift
    return mesh.copy().apply_transform(transform)


def test_a_mesh_against_itself_scores_perfectly():
    # same seed on both surfaces: identical meshes give identical points, so Chamfer is 0 up to rounding
    mesh = _asymmetric()
    result = mesh_metrics(mesh, mesh)
    assert result.chamfer < 1e-9
    assert result.fscore == {0.1: 1.0, 0.2: 1.0, 0.5: 1.0}
    np.testing.assert_allclose(result.rotation, np.eye(3), atol=1e-6)
    # the same surface with its faces in another order is sampled at other points: Chamfer is sampling noise
    shuffled = trimesh.Trimesh(mesh.vertices, np.random.default_rng(0).permutation(mesh.faces), process=False)
    noisy = mesh_metrics(shuffled, mesh)
    assert 1e-4 < noisy.chamfer < 0.01 and noisy.fscore[0.1] == 1.0


# the search covers the cube's rotations times azimuths in 15 degree steps; ICP mends the rest
@pytest.mark.parametrize("angles", [(90, 30), (90, 37), (180, 200), (-90, -97)],
                         ids=["on-grid", "between-azimuths", "upside-down", "y-up"])
def test_alignment_recovers_a_rotated_scaled_moved_copy(angles):
    gt = _asymmetric()
    rotation = Rotation.from_euler("xz", angles, degrees=True).as_matrix()  # about x, then about z
    result = mesh_metrics(_moved(gt, rotation), gt)
    assert result.chamfer < 2e-3, result
    assert result.fscore[0.1] == 1.0
    np.testing.assert_allclose(result.rotation, rotation.T, atol=0.02)  # the inverse takes pred back onto gt


def test_without_alignment_a_rotated_copy_scores_worse():
    gt = _asymmetric()
    moved = _moved(gt, Rotation.from_euler("xz", (90, 30), degrees=True).as_matrix())
    unaligned = mesh_metrics(moved, gt, align=False)
    assert unaligned.chamfer > 0.05 and unaligned.fscore[0.1] < 0.9
    assert unaligned.icp_iterations == 0


def test_concentric_spheres_without_normalisation_differ_by_the_radii():
    inner = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    outer = trimesh.creation.icosphere(subdivisions=4, radius=0.7)
    result = mesh_metrics(inner, outer, normalize=False, align=False)
    assert result.chamfer == pytest.approx(0.2, abs=2e-3)  # the flat faces sit a little inside the sphere
    assert result.fscore[0.1] == 0.0 and result.fscore[0.5] == 1.0
    # normalised, both become the same sphere
    assert mesh_metrics(inner, outer).chamfer < 1e-3


def test_search_rotations_are_distinct_proper_rotations_including_the_identity():
    rotations = search_rotations()
    assert rotations.shape == (224, 3, 3)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), np.broadcast_to(np.eye(3), (224, 3, 3)),
                               atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0)
    assert any(np.allclose(r, np.eye(3)) for r in rotations)
    assert len(np.unique(np.round(rotations, 6).reshape(224, -1), axis=0)) == 224


def test_mesh_files_load_and_bad_files_are_refused_by_name(tmp_path):
    mesh = _asymmetric()
    mesh.export(tmp_path / "mesh.glb")
    assert mesh_metrics(tmp_path / "mesh.glb", mesh).chamfer < 1e-6  # a path and a Trimesh of the same mesh
    trimesh.Scene([trimesh.creation.box(), trimesh.creation.icosphere()]).export(tmp_path / "scene.glb")
    assert len(load_mesh(tmp_path / "scene.glb").faces) == 12 + 1280  # a scene's parts are concatenated
    (tmp_path / "empty.obj").write_text("")
    (tmp_path / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    for name in ("empty.obj", "points.obj"):
        with pytest.raises(MeshLoadError, match=f"{name}: the mesh has no faces"):
            load_mesh(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.glb: no such mesh file"):
        mesh_metrics(tmp_path / "missing.glb", mesh)
    with pytest.raises(MeshLoadError, match="the predicted mesh has no faces"):
        mesh_metrics(trimesh.Trimesh(), mesh)


def test_the_command_prints_json_with_exactly_the_keys(tmp_path, capsys):
    gt = _asymmetric()
    gt.export(tmp_path / "gt.obj")
    _moved(gt, Rotation.from_euler("z", 90, degrees=True).as_matrix()).export(tmp_path / "pred.glb")
    assert main(["mesh-metrics", "--pred", str(tmp_path / "pred.glb"), "--gt", str(tmp_path / "gt.obj"),
                 "--json", "true", "--points", "4000"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"chamfer", "fscore@0.1", "fscore@0.2", "fscore@0.5", "rotation", "icp_iterations"}
    assert printed["chamfer"] < 2e-3 and printed["fscore@0.1"] == 1.0
    np.testing.assert_allclose(printed["rotation"], Rotation.from_euler("z", -90, degrees=True).as_matrix(),
                               atol=0.02)


def test_the_command_names_an_empty_mesh_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.ply").write_text("ply\nformat ascii 1.0\nelement vertex 0\nelement face 0\n"
                                        "property list uchar int vertex_indices\nend_header\n")
    _asymmetric().export(tmp_path / "gt.obj")
    monkeypatch.setattr(sys, "argv", ["vfusion3d-lightning", "mesh-metrics", "--pred", str(tmp_path / "empty.ply"),
                                      "--gt", str(tmp_path / "gt.obj")])
    assert console_main() == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vfusion3d-lightning: error: {tmp_path / 'empty.ply'}: the mesh has no faces; give a surface mesh with "
        "triangles"]
