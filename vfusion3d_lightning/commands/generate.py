"""`vfusion3d-lightning generate`: condition images + prompts -> orbit videos as shards (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vfusion3d_lightning.commands.common import DTYPES, PredictOptions
from vfusion3d_lightning.data.generate_shards import read_inputs
from vfusion3d_lightning.data.schema import ShardJobReport
from vfusion3d_lightning.models.video import SamplerSettings
from vfusion3d_lightning.training.generation import generate_shards, predict_trainer


def generate(model: str, inputs: Path, out: Path, frames: int = 16, size: int = 256, steps: int = 25,
             guidance: list[float] = [1.0, 3.0],  # noqa: B006 (jsonargparse reads the default)
             batch_size: int = 4, shard_size: int = 64, seed: int = 0, border_ratio: float | None = 0.2,
             background: Literal["auto", "rembg", "alpha", "white"] = "auto", decode_chunk: int = 8,
             dtype: Literal["float32", "bfloat16", "float16"] = "float32",
             trainer: PredictOptions = PredictOptions(),  # noqa: B008 (jsonargparse reads the default)
             num_workers: int = 2, progress: bool = True) -> ShardJobReport:
    """Generate one orbit video per condition image and prompt, as shards in the multi-view schema.

    Runs as Lightning's `Trainer.predict`, one shard a step: `--trainer.devices 8` spreads the shards over 8 GPUs,
    `--trainer.num_nodes` over machines (SLURM, torchrun). The inputs are dealt into shards once
    (`generate_plan.json`), and each video's seed comes from `seed` and its key, so any number of devices writes
    the same shards; a rerun after a kill skips finished shards and redoes those in flight.

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
        dtype: weights dtype.
        trainer: accelerator, devices, num_nodes and strategy of the Trainer.
        num_workers: loader processes that read and prepare the condition images.
        progress: show a progress bar (of shards).
    """
    if len(guidance) not in (1, 2):
        raise ValueError(f"--guidance takes one value or two (first and last frame), got {guidance}")
    settings = SamplerSettings(num_frames=frames, num_inference_steps=steps, min_guidance=guidance[0],
                               max_guidance=guidance[-1], decode_chunk=decode_chunk)
    items = read_inputs(inputs)  # a bad input line is an error before the model loads
    runner = predict_trainer(trainer.accelerator, trainer.devices, trainer.num_nodes, trainer.strategy, progress)
    report = generate_shards(model, items, out, settings, frame_size=size, batch_size=batch_size, seed=seed,
                             shard_size=shard_size, border_ratio=border_ratio, background=background,
                             model_name=str(model), dtype=DTYPES[dtype], trainer=runner, num_workers=num_workers,
                             progress=progress)
    if runner.is_global_zero:
        print(f"generated {report.written}, already present {report.skipped_existing}, failed {len(report.failed)} "
              f"-> {out} (report: generate_report.json)")
    return report
