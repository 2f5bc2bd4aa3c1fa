"""Geometry metrics of a predicted mesh against a ground-truth mesh: Chamfer distance and F-score after
normalisation and alignment, as image-to-3D papers report them on GSO and OmniObject3D.

Protocol (`mesh_metrics` with its defaults):

1. Sampling: `points` (10,000) points uniformly on each surface, area-weighted, with the same seed for both
   meshes (so identical meshes score Chamfer 0 and F-score 1 exactly).
2. Normalisation: each mesh is scaled into the unit cube [-0.5, 0.5]^3 around its bounding-box centre
   (uniform scale: the largest bounding-box side becomes 1), before alignment.
3. Alignment (the prediction moves onto the ground truth), all on the normalised points:
   a. rotation search: each of 224 rotations is scored by Chamfer distance on 2,000-point subsamples and the
      lowest kept. The 224 are the 24 rotations of the cube (axis conventions: which axis is up, flips), each
      composed before and after with turns of 0, 15, 30, 45, 60 and 75 degrees about the up axis (+Z),
      duplicates removed; with the cube's own 90 degree turns this covers the azimuth in 15 degree steps.
      A prediction tilted off the up axis by more than ICP can mend (about 10 degrees) is not recovered;
   b. the rotated prediction is normalised again to the unit cube (its bounding box in the ground truth's
      frame: a rotation off the cube's axes changes the box, so step 2 alone would leave it off scale);
      for rotations of the cube this changes nothing;
   c. ICP from there: rigid point-to-point (nearest neighbours of the prediction's points on the ground
      truth's, Kabsch/SVD fit), at most 50 iterations, stopping when the mean nearest-neighbour distance
      improves by less than 1e-6; then b and c once more, from the rotation ICP found.
4. Metrics, in the normalised unit: Chamfer = mean of the two directed mean nearest-neighbour Euclidean (not
   squared) distances; precision@t = fraction of predicted points within t of the ground truth's points,
   recall@t = fraction of ground-truth points within t of the predicted ones, F-score@t = their harmonic
   mean, for t in 0.1, 0.2 and 0.5.

With `normalize=False` the meshes keep their units (rotations are searched about the bounding-box centres);
with `align=False` they are compared where they are.

>>> result = mesh_metrics(extracted_mesh, "assets/mug.glb")      # a trimesh.Trimesh, a path, or both
>>> result.chamfer, result.fscore[0.1]
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

THRESHOLDS = (0.1, 0.2, 0.5)
SEARCH_POINTS = 2_000
ICP_ITERATIONS = 50
ICP_TOLERANCE = 1e-6
UP_TURNS = (0, 15, 30, 45, 60, 75)  # degrees about +Z composed with the cube's rotations in the search
ALIGN_PASSES = 2  # renormalise + ICP rounds after the search


class MeshLoadError(ValueError):
    """A mesh that cannot be measured: unreadable, without faces or area, or with non-finite vertices."""


@dataclass
class MeshMetrics:
    """Chamfer distance, F-score, precision and recall (dicts keyed by threshold) and the alignment found:
    `rotation` (3x3, p -> R p) turns the prediction onto the ground truth; `icp_iterations` summed over the
    ICP runs (0 without alignment)."""

    chamfer: float
    fscore: dict[float, float]
    precision: dict[float, float]
    recall: dict[float, float]
    rotation: list[list[float]] = field(default_factory=lambda: np.eye(3).tolist())
    icp_iterations: int = 0


def load_mesh(path: str | os.PathLike) -> trimesh.Trimesh:
    """A mesh file (GLB/GLTF, OBJ, PLY, ...) as one Trimesh, the parts of a scene concatenated with their
    transforms applied. Raises FileNotFoundError or MeshLoadError naming the file.

    Reads the file as stored (no up-axis conversion): the rotation search absorbs axis conventions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such mesh file")
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:
        raise MeshLoadError(f"{path}: cannot read the mesh ({type(exc).__name__}: {exc})") from exc
    return _checked(mesh, f"{path}: the mesh")


def _checked(mesh, name: str) -> trimesh.Trimesh:
    if isinstance(mesh, trimesh.Scene):
        mesh = mesh.to_geometry() if mesh.geometry else trimesh.Trimesh()
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise MeshLoadError(f"{name} has no faces; give a surface mesh with triangles")
    if not np.isfinite(mesh.vertices).all():
        raise MeshLoadError(f"{name} has NaN or inf vertex coordinates")
    if mesh.area <= 0:
        raise MeshLoadError(f"{name} has zero surface area")
    return mesh


def _as_mesh(mesh: trimesh.Trimesh | trimesh.Scene | str | os.PathLike, role: str) -> trimesh.Trimesh:
    if isinstance(mesh, (str, os.PathLike)):
        return load_mesh(mesh)
    return _checked(mesh, f"the {role} mesh")


def _surface_vertices(mesh: trimesh.Trimesh) -> np.ndarray:
    """The vertices the faces use (V, 3)."""
    return mesh.vertices[np.unique(mesh.faces)]


def _bounds(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """(bounding-box centre (3,), largest side) of points (N, 3)."""
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return (lo + hi) / 2, float((hi - lo).max())


def _to_unit_cube(points: np.ndarray, centre: np.ndarray, side: float) -> np.ndarray:
    return (points - centre) / side


def search_rotations() -> np.ndarray:
    """The candidate rotations of step 3a, (224, 3, 3)."""
    cube = Rotation.create_group("O").as_matrix()  # the 24 rotations of the cube
    turns = Rotation.from_euler("z", np.array(UP_TURNS, float)[:, None], degrees=True).as_matrix()
    candidates = [t @ c for t, c in itertools.product(turns, cube)] + [c @ t for t, c in itertools.product(turns, cube)]
    _, keep = np.unique(np.round(np.stack(candidates), 6).reshape(len(candidates), -1), axis=0, return_index=True)
    return np.stack(candidates)[np.sort(keep)]


def _best_rotation(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The candidate rotation (about the origin) with the lowest Chamfer distance on subsamples."""
    pred = pred[rng.permutation(len(pred))[:SEARCH_POINTS]]
    gt = gt[rng.permutation(len(gt))[:SEARCH_POINTS]]
    pred_tree, gt_tree = cKDTree(pred), cKDTree(gt)
    candidates, scores = search_rotations(), []
    for rotation in candidates:
        # rotating gt by the inverse gives the same gt -> pred distances with one tree per side
        to_gt = gt_tree.query(pred @ rotation.T, workers=-1)[0].mean()
        to_pred = pred_tree.query(gt @ rotation, workers=-1)[0].mean()
        scores.append(to_gt + to_pred)
    return candidates[int(np.argmin(scores))]


def _kabsch(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rotation R and translation t minimising |R source + t - target|^2 over paired points (N, 3)."""
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    u, _, vt = np.linalg.svd((source - source_mean).T @ (target - target_mean))
    sign = np.sign(np.linalg.det(vt.T @ u.T))  # no reflections
    rotation = vt.T @ np.diag([1.0, 1.0, sign]) @ u.T
    return rotation, target_mean - rotation @ source_mean


def icp(source: np.ndarray, target: np.ndarray, iterations: int = ICP_ITERATIONS,
        tolerance: float = ICP_TOLERANCE) -> tuple[np.ndarray, np.ndarray, int]:
    """Rigid point-to-point ICP moving `source` (N, 3) onto `target` (M, 3): (rotation (3, 3), translation (3,),
    iterations run). Stops when the mean nearest-neighbour distance improves by less than `tolerance`."""
    tree = cKDTree(target)
    rotation, translation = np.eye(3), np.zeros(3)
    previous = np.inf
    for iteration in range(1, iterations + 1):
        moved = source @ rotation.T + translation
        distances, nearest = tree.query(moved, workers=-1)
        if previous - distances.mean() < tolerance:
            return rotation, translation, iteration
        previous = distances.mean()
        step_rotation, step_translation = _kabsch(moved, target[nearest])
        rotation, translation = step_rotation @ rotation, step_rotation @ translation + step_translation
    return rotation, translation, iterations


def _align(pred: np.ndarray, gt: np.ndarray, pred_vertices: np.ndarray | None,
           seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Steps 3a-c: (aligned prediction (N, 3), rotation (3, 3), ICP iterations). `pred_vertices` (V, 3), in
    the points' frame, give the bounding box of the renormalisation; None skips it (and the second ICP)."""
    rotation = _best_rotation(pred, gt, np.random.default_rng(seed))
    pred = pred @ rotation.T
    vertices = None if pred_vertices is None else pred_vertices @ rotation.T
    iterations = 0
    for _ in range(1 if vertices is None else ALIGN_PASSES):
        if vertices is not None:
            centre, side = _bounds(vertices)
            pred, vertices = _to_unit_cube(pred, centre, side), _to_unit_cube(vertices, centre, side)
        step, translation, run = icp(pred, gt)
        pred = pred @ step.T + translation
        vertices = None if vertices is None else vertices @ step.T + translation
        rotation, iterations = step @ rotation, iterations + run
    return pred, rotation, iterations


def point_metrics(pred: np.ndarray, gt: np.ndarray, thresholds=THRESHOLDS) -> tuple[float, dict, dict, dict]:
    """(Chamfer, F-score, precision, recall) of point sets (N, 3) and (M, 3); dicts keyed by threshold."""
    to_gt = cKDTree(gt).query(pred, workers=-1)[0]
    to_pred = cKDTree(pred).query(gt, workers=-1)[0]
    chamfer = float((to_gt.mean() + to_pred.mean()) / 2)
    precision = {t: float((to_gt <= t).mean()) for t in thresholds}
    recall = {t: float((to_pred <= t).mean()) for t in thresholds}
    fscore = {t: 2 * precision[t] * recall[t] / (precision[t] + recall[t]) if precision[t] + recall[t] else 0.0
              for t in thresholds}
    return chamfer, fscore, precision, recall


def mesh_metrics(pred: trimesh.Trimesh | str | os.PathLike, gt: trimesh.Trimesh | str | os.PathLike,
                 points: int = 10_000, thresholds: tuple[float, ...] = THRESHOLDS, normalize: bool = True,
                 align: bool = True, seed: int = 0) -> MeshMetrics:
    """Chamfer distance and F-score of `pred` against `gt` by the protocol of this module's docstring.

    Args:
        pred: the predicted mesh: a trimesh.Trimesh (or Scene) or a mesh file.
        gt: the ground-truth mesh, likewise.
        points: points sampled on each surface.
        thresholds: F-score distance thresholds, in the normalised unit (the unit cube's side).
        normalize: scale both into the unit cube first (and the prediction again after alignment).
        align: search the rotation and refine with ICP; otherwise compare the meshes as placed.
        seed: seeds the surface sampling and the search's subsamples.
    """
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    if not thresholds or min(thresholds) <= 0:
        raise ValueError(f"thresholds must be positive distances, got {thresholds}")
    pred_mesh, gt_mesh = _as_mesh(pred, "predicted"), _as_mesh(gt, "ground-truth")
    # 1. the same seed on both: sampling commutes with scaling and moving, so normalise the points
    pred_points = trimesh.sample.sample_surface(pred_mesh, points, seed=seed)[0]
    gt_points = trimesh.sample.sample_surface(gt_mesh, points, seed=seed)[0]
    # 2. normalisation (without it the points are only centred, for the search, and moved back after)
    pred_vertices, gt_vertices = _surface_vertices(pred_mesh), _surface_vertices(gt_mesh)
    pred_centre, pred_side = _bounds(pred_vertices)
    gt_centre, gt_side = _bounds(gt_vertices)
    scale_pred, scale_gt = (pred_side, gt_side) if normalize else (1.0, 1.0)
    pred_points = _to_unit_cube(pred_points, pred_centre, scale_pred)
    gt_points = _to_unit_cube(gt_points, gt_centre, scale_gt)
    # 3. alignment
    rotation, iterations = np.eye(3), 0
    if align:
        renormalize = _to_unit_cube(pred_vertices, pred_centre, scale_pred) if normalize else None
        pred_points, rotation, iterations = _align(pred_points, gt_points, renormalize, seed)
    if not normalize:
        gt_points = gt_points + gt_centre
        pred_points = pred_points + (gt_centre if align else pred_centre)
    # 4. metrics
    chamfer, fscore, precision, recall = point_metrics(pred_points, gt_points, thresholds)
    return MeshMetrics(chamfer, fscore, precision, recall, rotation.tolist(), iterations)
