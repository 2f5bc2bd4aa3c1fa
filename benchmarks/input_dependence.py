"""Does an LRM read its input? Held-out PSNR of its own prediction beside the same views predicted from another
object's input, the constant background, opacity IoU, and the object colour it renders against the input's.

    python benchmarks/input_dependence.py --lrm outputs/pipeline/quickstart/lrm_finetune/finetuned \
        --shards 'outputs/pipeline/quickstart/render/held_out32/shard-*.tar' --strip input_dependence.png

A model that learnt only the mean object scores the same with another object's input as with its own and
renders every object in one colour. `--strip` writes one row per object: the input, a ground-truth view and
six turntable frames. The README's "The whole pipeline" gives its numbers for the quickstart.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vfusion3d_lightning.evaluation import Evaluator, held_out_samples, psnr_per_view
from vfusion3d_lightning.models.lrm import LRM
from vfusion3d_lightning.training.losses import build_lpips


def object_colour(rgb: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """Mean colour (3,) of the object in renders on white (V, 3, S, S) with opacity (V, 1, S, S), un-composited
    from the white background over pixels of opacity > 0.5."""
    inside = opacity > 0.5
    colour = (rgb - (1 - opacity)) / opacity.clamp_min(1e-3)
    return (colour * inside).sum((0, 2, 3)) / inside.sum().clamp_min(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrm", required=True, help="LRM source: save_pretrained folder, .ckpt, Hub id")
    parser.add_argument("--shards", required=True, help="held-out multi-view shards (glob)")
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--input_size", type=int, default=56)
    parser.add_argument("--render_size", type=int, default=32)
    parser.add_argument("--strip", default=None, help="PNG of inputs, a ground-truth view and turntables")
    args = parser.parse_args()

    evaluator = Evaluator(LRM.from_pretrained(args.lrm), build_lpips(None, random_backbone=True),
                          input_size=args.input_size, render_size=args.render_size)
    views = [evaluator.views(sample) for sample in list(held_out_samples(args.shards))[:args.objects]]
    if len(views) < 2:
        raise SystemExit(f"--shards {args.shards!r}: need at least 2 objects to swap inputs, found {len(views)}")
    planes = [evaluator.planes(v) for v in views]
    rows, strip = [], []
    for index, view in enumerate(views):
        target = view["target_images"][view["scored_views"]]
        alpha = view["target_masks"][view["scored_views"]]
        rendered, opacity = evaluator.render_with_opacity(view, planes[index])
        swapped, _ = evaluator.render_with_opacity(view, planes[(index + 1) % len(views)])
        scores = evaluator.score(view, rendered, opacity)  # with the constant background's on the same views
        rows.append({
            "object": view["object_id"],
            "psnr": scores.psnr,
            "psnr_other_input": psnr_per_view(swapped, target).mean().item(),
            "psnr_background": scores.baseline["psnr"],
            "opacity_iou": scores.opacity_iou,
            "colour": [round(c, 3) for c in object_colour(rendered, opacity).tolist()],
            "true_colour": [round(c, 3) for c in object_colour(target, alpha).tolist()],
        })
        print(json.dumps(rows[-1]))
        if args.strip:
            size = args.render_size
            frames = evaluator.turntable(view, planes[index], frames=6, size=size)
            image = F.interpolate(view["input_image"][None], size=size, mode="area")[0]
            strip.append(torch.cat([image, target[0], *frames], dim=2))
    means = {key: float(np.mean([row[key] for row in rows]))
             for key in ("psnr", "psnr_other_input", "psnr_background", "opacity_iou")}
    colours = np.array([row["colour"] for row in rows])
    means["colour_spread"] = float(colours.std(0).mean())  # 0: one colour for every object
    means["true_colour_spread"] = float(np.array([row["true_colour"] for row in rows]).std(0).mean())
    print(json.dumps({"mean": means}))
    if args.strip:
        pixels = (torch.cat(strip, dim=1).permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(args.strip)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
