"""`vfusion3d-lightning images`: prompts -> first-frame images with a text-to-image model (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vfusion3d_lightning.commands.common import DTYPES, PredictOptions
from vfusion3d_lightning.data.first_frames import (
    DEFAULT_SUFFIX,
    REPORT_FILE,
    ImageSettings,
    load_text_to_image,
    resolve_pipeline,
)
from vfusion3d_lightning.data.prompts import normalise, read_captions
from vfusion3d_lightning.training.generation import make_first_frames, predict_trainer


def images(prompts: Path, model: str, out: Path, suffix: str = DEFAULT_SUFFIX, negative_prompt: str = "",
           steps: int = 30, guidance: float = 7.5, size: int = 512, batch_size: int = 4, seed: int = 0,
           max_prompts: int | None = None, field: str = "caption",
           dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto", allow_download: bool = False,
           trainer: PredictOptions = PredictOptions(),  # noqa: B008 (jsonargparse reads the default)
           progress: bool = True) -> dict:
    """Make one first-frame image per prompt with a diffusers text-to-image model: `<index>.png` and
    `<index>.txt` (the prompt) per prompt, the folder `generate --inputs` reads. Each image is seeded by the run
    seed, its prompt and its index, so a killed run resumes where it stopped and gives the same images; a rerun
    skips finished prompts. images_report.json holds the counts and settings. Runs as Lightning's
    `Trainer.predict`, a batch a step: `--trainer.devices 8` spreads the batches over 8 GPUs (the same images).

    Args:
        prompts: prompts.txt (one a line, as the `prompts` command writes), or a .jsonl/.csv file (`field`).
        model: a text-to-image pipeline folder (model_index.json) or a Hub id in the local cache (a good default:
            stabilityai/stable-diffusion-xl-base-1.0, CreativeML Open RAIL++-M; the paper used Meta's EMU).
        out: folder for the images, their .txt prompts and images_report.json.
        suffix: appended to each prompt the model sees, not to the .txt ("" for none).
        negative_prompt: what the images should not show ("" for none).
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        size: image side in pixels (a multiple of 8).
        batch_size: prompts per pipeline call.
        seed: run seed; each image's seed derives from it, its prompt and its index.
        max_prompts: only the first this many prompts (null: all).
        field: JSONL field / CSV column of the prompt.
        dtype: weights dtype; `auto`: bfloat16 on a GPU, float32 on the CPU.
        allow_download: let diffusers download `model` from the Hugging Face Hub.
        trainer: accelerator, devices, num_nodes and strategy of the Trainer.
        progress: show a progress bar (of batches).
    """
    local_only = not allow_download
    resolve_pipeline(model, local_only)  # fail on a missing or wrong model before reading any prompt
    texts = [text for text in map(normalise, read_captions(prompts, field)) if text]
    if not texts:
        raise ValueError(f"{prompts} holds no prompts; write one a line (the `prompts` command writes prompts.txt)")
    if max_prompts is not None:
        texts = texts[:max_prompts]
    def load(device: torch.device):
        # auto: bfloat16 rather than float16 on a GPU (some VAEs overflow in float16)
        chosen = dtype if dtype != "auto" else "float32" if device.type == "cpu" else "bfloat16"
        return load_text_to_image(model, device, DTYPES[chosen], local_only)

    settings = ImageSettings(suffix=suffix, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                             size=size, seed=seed)
    runner = predict_trainer(trainer.accelerator, trainer.devices, trainer.num_nodes, trainer.strategy, progress)
    report = make_first_frames(texts, out, load, settings, batch_size=batch_size, model_name=str(model),
                               trainer=runner)
    if runner.is_global_zero:
            print(f"{report['prompts']} prompts: {report['written']} images written, {report['skipped_existing']} "
              f"already present -> {out} (report: {Path(out) / REPORT_FILE})")
    return report
