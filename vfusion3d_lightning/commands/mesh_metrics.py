"""`vfusion3d-lightning mesh-metrics`: Chamfer distance and F-score of a mesh against a ground-truth mesh."""

from __future__ import annotations

import json as json_module
from pathlib import Path

from vfusion3d_lightning.geometry import metrics


def metrics_record(result: metrics.MeshMetrics) -> dict:
    """The JSON object of a result: `chamfer`, `fscore@T` per threshold, `rotation`, `icp_iterations`."""
    return {"chamfer": result.chamfer, **{f"fscore@{t:g}": f for t, f in result.fscore.items()},
            "rotation": result.rotation, "icp_iterations": result.icp_iterations}


def mesh_metrics(pred: Path, gt: Path, points: int = 10_000, thresholds: tuple[float, ...] = metrics.THRESHOLDS,
                 normalize: bool = True, align: bool = True, seed: int = 0, json: bool = False) -> dict:
    """Chamfer distance and F-score of a predicted mesh against a ground-truth mesh, after normalising both to
    the unit cube and aligning the prediction (rotation search + ICP), as papers report geometry on GSO.

    Args:
        pred: the predicted mesh file (GLB/GLTF, OBJ, PLY, ...).
        gt: the ground-truth mesh file.
        points: points sampled on each surface.
        thresholds: F-score distance thresholds, in the unit cube's side.
        normalize: scale both meshes into [-0.5, 0.5]^3 first; false compares them in their own units.
        align: search the best rotation and refine it with ICP; false compares the meshes as placed.
        seed: seeds the surface sampling.
        json: print one JSON object (`chamfer`, `fscore@T`, `rotation`, `icp_iterations`) instead of a table.
    """
    result = metrics.mesh_metrics(pred, gt, points=points, thresholds=tuple(thresholds), normalize=normalize,
                                  align=align, seed=seed)
    record = metrics_record(result)
    if json:
        print(json_module.dumps(record))
    else:
        print(f"chamfer      {result.chamfer:.6f}")
        for t, fscore in result.fscore.items():
            print(f"fscore@{t:<6g}{fscore:.4f}  (precision {result.precision[t]:.4f}, recall {result.recall[t]:.4f})")
        print(f"alignment    {result.icp_iterations} ICP iterations" if align else "alignment    none")
    return record
