"""`vfusion3d-lightning evaluate`: novel-view metrics of LRM checkpoints on held-out multi-view shards."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vfusion3d_lightning.commands.common import DTYPES, resolve_device
from vfusion3d_lightning.data.datamodules import count_samples, expand_shards
from vfusion3d_lightning.evaluation import (
    DEFAULT_CLIP,
    PSNR_CAP,
    Evaluator,
    ObjectScores,
    checkpoint_names,
    held_out_samples,
    load_clip,
    plot_distributions,
    summary_table,
    write_csv,
)
from vfusion3d_lightning.io import atomic_write
from vfusion3d_lightning.models.lrm import LRM
from vfusion3d_lightning.training.losses import build_lpips


def evaluate(checkpoint: list[str], shards: str, out: Path, clip: str = DEFAULT_CLIP,
             lpips_weights: Path | None = None, lpips_random_backbone: bool = False, max_objects: int | None = None,
             input_view: int = 0, input_size: int = 512, render_size: int | None = None, views_per_batch: int = 8,
             device: str = "auto", dtype: Literal["float32", "bfloat16"] = "float32",
             seed: int = 0) -> dict[str, list[ObjectScores]]:
    """Per held-out object, give one view to each LRM, render every view from its ground-truth camera and
    compare on white by PSNR, SSIM and LPIPS (CLIP similarity too, with a CLIP model); write each checkpoint's
    objects.csv, a side-by-side summary.md (mean ± std over objects) and box plots.

    Args:
        checkpoint: LRMs to evaluate: save_pretrained folders, weights files, registry names or LRMModule .ckpt
            files; several are compared side by side.
        shards: held-out multi-view shards (a folder, brace pattern or glob), e.g. renders made with
            `render --views uniform32`.
        out: folder for <checkpoint>/objects.csv, summary.md and plots/.
        clip: CLIP folder or hub id in the local cache; `none` skips the CLIP metrics.
        lpips_weights: torchvision VGG16 weights for LPIPS (default: the torch hub cache).
        lpips_random_backbone: an untrained LPIPS trunk: for tests only, its LPIPS numbers mean nothing.
        max_objects: evaluate the first N objects only.
        input_view: the view given to the LRM.
        input_size: encoder input size in pixels.
        render_size: render and compare at this size (default: the shards' resolution).
        views_per_batch: views rendered per call.
        device: `auto` (the GPU if any), `cpu`, `cuda`, `cuda:N`.
        dtype: `bfloat16` runs the LRM under autocast.
        seed: seeds the renderer's sample jitter.
    """
    out, device = Path(out), resolve_device(device)
    total = count_samples(expand_shards(shards)) if "://" not in shards else None
    # weights of the judges first: a missing LPIPS or CLIP model fails before any LRM is loaded
    lpips_model = build_lpips(lpips_weights, lpips_random_backbone)
    clip_model = None if str(clip).lower() == "none" else load_clip(clip, device)
    results: dict[str, list[ObjectScores]] = {}
    for name, source in zip(checkpoint_names(checkpoint), checkpoint):
        evaluator = Evaluator(LRM.from_pretrained(source), lpips_model, clip_model, device=device, dtype=DTYPES[dtype],
                              input_view=input_view, input_size=input_size, render_size=render_size,
                              views_per_batch=views_per_batch, seed=seed)
        scores = evaluator.evaluate(held_out_samples(shards), max_objects, total, desc=name)
        if not scores:
            raise ValueError(f"no samples in {shards}")
        results[name] = scores
        print(f"{name}: {len(scores)} objects -> {write_csv(out / name / 'objects.csv', scores)}")
        del evaluator  # free the LRM before loading the next
    table = summary_table(results)
    note = (f"\nInput view {input_view}; means ± std over objects of per-object means over views; "
            f"PSNR per view capped at {PSNR_CAP:g} dB; CLIP: cosine similarity, novel views only.\n")
    atomic_write(out / "summary.md", lambda tmp: tmp.write_text(table + note))
    print(table + note)
    for path in plot_distributions(results, out / "plots"):
        print(f"plot -> {path}")
    return results
