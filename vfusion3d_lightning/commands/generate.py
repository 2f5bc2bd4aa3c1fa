"""`vfusion3d-lightning generate`: condition images + prompts -> orbit videos as shards (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vfusion3d_lightning.commands.common import DTYPES, resolve_device
from vfusion3d_lightning.data.generate_shards import generate_shards, read_inputs
from vfusion3d_lightning.data.schema import ShardJobReport
from vfusion3d_lightning.models.video import SamplerSettings, VideoDiffusionModel


def generate(model: str, inputs: Path, out: Path, frames: int = 16, size: int = 256, steps: int = 25,
             guidance: list[float] = [1.0, 3.0],  # noqa: B006 (jsonargparse reads the default)
             batch_size: int = 4, shard_size: int = 64, seed: int = 0, border_ratio: float | None = 0.2,
             background: Literal["auto", "rembg", "alpha", "white"] = "auto", decode_chunk: int = 8,
             device: str = "auto", dtype: Literal["float32", "bfloat16", "float16"] = "float32",
             progress: bool = True) -> ShardJobReport:
    """Generate one orbit video per condition image and prompt, as shards in the multi-view schema.

    Each video's seed comes from `seed` and its key, so a rerun after a kill skips finished shards, redoes the
    partial one and gives the same videos.

    Args:
        model: a VideoDiffusionModule .ckpt, an exported folder, a diffusers folder or an architecture name
            (random weights).
        inputs: a folder of images (prompts in same-stem .txt files), or a .jsonl/.csv file with `image` and
            `prompt` fields.
        out: folder for shard-NNNNNN.tar files and generate_report.json.
        frames: frames per video.
        size: frame size in pixels.
        steps: denoising steps.
        guidance: classifier-free guidance: one value, or the first-frame and last-frame values.
        batch_size: videos per sampler call.
        shard_size: videos per shard (a kill redoes one shard).
        seed: run seed; each video's seed derives from it and the video's key.
        border_ratio: recentre the object with this margin; null keeps the image's framing.
        background: `auto`: the alpha channel if any, else rembg; `white`: objects on plain white.
        decode_chunk: frames per VAE decode call.
        device: `auto` (the GPU if any), `cpu`, `cuda`, `cuda:N`.
        dtype: weights dtype.
        progress: show a progress bar.
    """
    if len(guidance) not in (1, 2):
        raise ValueError(f"--guidance takes one value or two (first and last frame), got {guidance}")
    items = read_inputs(inputs)
    network = VideoDiffusionModel.from_pretrained(model).to(resolve_device(device), DTYPES[dtype]).eval()
    settings = SamplerSettings(num_frames=frames, num_inference_steps=steps, min_guidance=guidance[0],
                               max_guidance=guidance[-1], decode_chunk=decode_chunk)
    with torch.no_grad():
        report = generate_shards(network, items, out, settings, frame_size=size, batch_size=batch_size, seed=seed,
                                 shard_size=shard_size, border_ratio=border_ratio, background=background,
                                 model_name=str(model), progress=progress)
    print(f"generated {report.written}, already present {report.skipped_existing}, failed {len(report.failed)} "
          f"-> {out} (report: generate_report.json)")
    return report
