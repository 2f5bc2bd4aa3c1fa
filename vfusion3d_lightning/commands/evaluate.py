"""`vfusion3d-lightning evaluate`: novel-view and geometry metrics of LRM checkpoints on held-out objects."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from vfusion3d_lightning.commands.common import DTYPES, resolve_device
from vfusion3d_lightning.data.datamodules import count_samples, expand_shards
from vfusion3d_lightning.evaluation import (
    BASELINE,
    DEFAULT_CLIP,
    PSNR_CAP,
    Evaluator,
    GroundTruthMeshes,
    ObjectScores,
    baseline_gains,
    checkpoint_names,
    held_out_samples,
    load_clip,
    plot_distributions,
    summary_table,
    write_csv,
)
from vfusion3d_lightning.evaluation_report import Report
from vfusion3d_lightning.io import atomic_write
from vfusion3d_lightning.models.lrm import LRM
from vfusion3d_lightning.training.losses import build_lpips


def evaluate(checkpoint: list[str], shards: str, out: Path, clip: str = DEFAULT_CLIP,
             lpips_weights: Path | None = None, lpips_random_backbone: bool = False, max_objects: int | None = None,
             input_view: int | None = None, input_size: int = 512, render_size: int | None = None,
             views_per_batch: int = 8, device: str = "auto", dtype: Literal["float32", "bfloat16"] = "float32",
             seed: int = 0, assets: Path | None = None, geometry: bool = True, mesh_resolution: int | None = None,
             mesh_threshold: float | None = 1.0, mesh_points: int = 10_000, report: bool = True,
             report_objects: int = 16) -> dict[str, list[ObjectScores]]:
    """Per held-out object, give one view to each LRM and score two tracks. Novel views: render every other
    view from its ground-truth camera and compare on white by PSNR, SSIM and LPIPS (CLIP similarity too, with
    a CLIP model); the input view is not scored. Geometry (with --assets): extract the LRM's mesh and compare
    it with the asset's by Chamfer distance and F-score after normalisation and alignment. Writes each
    checkpoint's objects.csv, a side-by-side summary.md (mean ± std over objects), box plots and report.html: the
    numbers next to the pictures (input view, ground truth and rendered views, turntable, mesh) per object.

    Args:
        checkpoint: LRMs to evaluate: save_pretrained folders, weights files, registry names or LRMModule .ckpt
            files; several are compared side by side.
        shards: held-out multi-view shards (a folder, brace pattern or glob), e.g. renders made with
            `render --views uniform32`.
        out: folder for <checkpoint>/objects.csv, summary.md, plots/, report.html and its pictures (report/).
        clip: CLIP folder or hub id in the local cache; `none` skips the CLIP metrics.
        lpips_weights: torchvision VGG16 weights for LPIPS (default: the torch hub cache).
        lpips_random_backbone: an untrained LPIPS trunk: for tests only, its LPIPS numbers mean nothing.
        max_objects: evaluate the first N objects only.
        input_view: the view given to the LRM, the same for every object; unset: drawn per object from
            (seed, object id), reproducibly.
        input_size: encoder input size in pixels.
        render_size: render and compare at this size (default: the shards' resolution).
        views_per_batch: views rendered per call.
        device: `auto` (the GPU if any), `cpu`, `cuda`, `cuda:N`.
        dtype: `bfloat16` runs the LRM under autocast.
        seed: seeds the input views, the renderer's sample jitter and the geometry metrics' point sampling.
        assets: the held-out assets folder the shards were rendered from: the ground-truth meshes of the
            geometry track (without it the geometry columns are n/a).
        geometry: run the geometry track (marching cubes and alignment per object and checkpoint).
        mesh_resolution: density grid points per axis for the mesh (auto: 256 on a GPU, 128 on a CPU).
        mesh_threshold: density level of the surface (the released 1.0); an object with no surface there
            scores NaN, is counted, and a warning suggests a level that has one. null: each object's grid
            median, for LRMs not trained to the released density scale (the quickstart's); say so with the
            numbers.
        mesh_points: points sampled on each surface for Chamfer and F-score (the field's 10,000; fewer is
            faster and noisier).
        report: write report.html (pictures of the first `report_objects` objects per checkpoint).
        report_objects: objects shown in the report (the page says how many more were scored).
    """
    out, device = Path(out), resolve_device(device)
    pages = Report(out, report_objects) if report else None  # a bad report_objects fails before any work
    if mesh_resolution is None:
        mesh_resolution = 256 if device.startswith("cuda") else 128
    ground_truth = None
    if geometry and assets is None:
        print("vfusion3d-lightning: no --assets: geometry metrics are n/a (give the held-out assets folder the "
              "shards were rendered from, or --geometry false)", file=sys.stderr)
    elif geometry:
        ground_truth = GroundTruthMeshes(assets)
    total = count_samples(expand_shards(shards)) if "://" not in shards else None
    # weights of the judges first: a missing LPIPS or CLIP model fails before any LRM is loaded
    lpips_model = build_lpips(lpips_weights, lpips_random_backbone)
    clip_model = None if str(clip).lower() == "none" else load_clip(clip, device)
    results: dict[str, list[ObjectScores]] = {}
    baselines: dict = {}  # the constant background's scores, shared by the checkpoints' evaluators
    try:
        for name, source in zip(checkpoint_names(checkpoint), checkpoint):
            evaluator = Evaluator(LRM.from_pretrained(source), lpips_model, clip_model, device=device,
                                  dtype=DTYPES[dtype], input_view=input_view, input_size=input_size,
                                  render_size=render_size, views_per_batch=views_per_batch, seed=seed,
                                  ground_truth=ground_truth,
                                  mesh_resolution=mesh_resolution, mesh_threshold=mesh_threshold,
                                  mesh_points=mesh_points, baselines=baselines,
                                  on_object=pages.hook(name) if pages else None)
            scores = evaluator.evaluate(held_out_samples(shards), max_objects, total, desc=name)
            if not scores:
                raise ValueError(f"no samples in {shards}")
            results[name] = scores
            print(f"{name}: {len(scores)} objects -> {write_csv(out / name / 'objects.csv', scores)}")
            no_surface = sum(s.no_surface for s in scores)
            if no_surface:
                print(f"vfusion3d-lightning: warning: {name}: {no_surface} of {len(scores)} objects have no surface at "
                      f"density {mesh_threshold:g}: their geometry metrics are NaN (see the suggested levels above; "
                      "--mesh_threshold)", file=sys.stderr)
            del evaluator  # free the LRM before loading the next
    except BaseException:
        if pages:
            pages.close()  # the mesh renderer's OpenGL context, and the pictures of a run that failed
        raise
    table = summary_table(results, geometry)
    chosen = f"input view {input_view}" if input_view is not None else f"input view drawn per object (seed {seed})"
    note = (f"\nNovel views: {chosen}, not scored; means ± std over objects of per-object means over the other "
            f"views; PSNR per view capped at {PSNR_CAP:g} dB; CLIP: cosine similarity. Opacity IoU: rendered "
            f"opacity > 0.5 against the ground-truth alpha > 0.5. {BASELINE}: the white background everywhere (an "
            "empty opacity), scored on the same views: the figures to beat.\n" + baseline_gains(results))
    if geometry:
        level = f"density {mesh_threshold:g}" if mesh_threshold is not None else "each object's median density"
        note += (f"Geometry: mesh at {level} on a {mesh_resolution}^3 grid against the asset's, "
                 f"{mesh_points:,} points on each surface, after unit-cube normalisation"
                 ", rotation search and ICP; Chamfer and F-score thresholds in the unit "
                 "cube's side; mesh seconds: image -> planes -> mesh."
                 + ("" if ground_truth else " No --assets: nothing measured.") + "\n")
    atomic_write(out / "summary.md", lambda tmp: tmp.write_text(table + note))
    print(table + note)
    plots = plot_distributions(results, out / "plots")
    for path in plots:
        print(f"plot -> {path}")
    if pages:
        print(f"report -> {pages.write(results, geometry, note, plots, meshes=ground_truth is not None)}")
        pages.close()
    return results
