"""Where a trained SVD-style video model denoises well: one-step denoising error on held-out orbits at each
noise level (RMSE of the denoised frames against the truth, next to sigma itself, the error of doing nothing),
and orbit grids sampled with several lowest noise levels (the scheduler's sigma_min).

    python benchmarks/video_denoise_by_sigma.py CKPT VAL_SHARDS_DIR OUT_DIR [--sigma-min 0.002 0.02]
"""

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image
from video_first_frames import samples

from vfusion3d_lightning.io import on_white
from vfusion3d_lightning.models.video import VideoDiffusionModel
from vfusion3d_lightning.models.video.objectives import EDMObjective
from vfusion3d_lightning.models.video.sampler import OrbitVideoPipeline, SamplerSettings
from vfusion3d_lightning.training.video_diffusion import orbit_grid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("shards")
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--sigma-min", type=float, nargs="+", default=[0.002, 0.02])
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = VideoDiffusionModel.from_pretrained(args.checkpoint).to(device).eval()
    truth = list(samples(args.shards).values())[:args.count]
    frames = torch.stack([on_white(s.images) for s in truth]).to(device)
    prompts = [s.prompt or "" for s in truth]
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        clean = model.encode_frames(frames, generator)
        cond = model.conditions(frames[:, 0], prompts, frames.shape[1])
        for sigma in [0.002, 0.005, 0.02, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0]:
            noisy = clean + sigma * torch.randn(clean.shape, generator=generator, device=device)
            log_sigma = torch.full((clean.shape[0],), math.log(sigma), device=device)
            denoised = EDMObjective.denoise(model, noisy, log_sigma, cond)
            rmse = (denoised - clean).pow(2).mean().sqrt().item()
            print(json.dumps({"sigma": sigma, "denoised_rmse": round(rmse, 4), "noisy_rmse": sigma}))

    Path(args.out).mkdir(parents=True, exist_ok=True)
    base_config = dict(model.scheduler.config)
    for sigma_min in args.sigma_min:
        model.scheduler = type(model.scheduler).from_config({**base_config, "sigma_min": sigma_min})
        settings = SamplerSettings(num_frames=frames.shape[1], num_inference_steps=args.steps,
                                   min_guidance=1.0, max_guidance=2.0)
        generated = OrbitVideoPipeline(model, settings)(frames[:, 0], prompts, seeds=list(range(len(truth))),
                                                        progress=False)
        grid = orbit_grid(torch.stack([frames, generated], 1).flatten(0, 1))
        path = Path(args.out) / f"orbits_sigma_min_{sigma_min:g}.png"
        Image.fromarray(grid).save(path)
        print(f"sigma_min {sigma_min:g}: {len(truth)} orbits (each under its ground truth) -> {path}")


if __name__ == "__main__":
    main()
