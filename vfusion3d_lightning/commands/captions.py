"""`vfusion3d-lightning captions`: caption 3D assets' renders as Cap3D does, view captions summarised by an LLM."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from vfusion3d_lightning.commands.common import DTYPES, PredictOptions
from vfusion3d_lightning.data.captions import CAPTIONS_FILE, CaptionSummarizer, ViewCaptioner, resolve_captioner
from vfusion3d_lightning.data.prompts import resolve_model
from vfusion3d_lightning.training.generation import caption_shards, predict_trainer


def captions(shards: list[Path], out: Path, captioner: str, llm: str, views: int = 8, batch_size: int = 8,
             max_new_tokens: int = 40, dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
             allow_download: bool = False,
             trainer: PredictOptions = PredictOptions(),  # noqa: B008 (jsonargparse reads the default)
             progress: bool = True) -> dict:
    """Caption each object of multi-view render shards as Cap3D does: an image captioner (BLIP-2) captions
    `views` views spread around it, and an LLM summarises them into one caption. Each caption is appended to
    captions.jsonl as it is made, so a killed run resumes; then every input folder F is copied to OUT/F's name
    with each sample's prompt set to its object's caption, and prompts.txt lists the captions. Runs as
    Lightning's `Trainer.predict`, an input shard a step: `--trainer.devices 8` spreads the shards over 8 GPUs.

    Args:
        shards: folders of render shards (shard-NNNNNN.tar), with different names; an object in several is
            captioned once.
        out: folder for captions.jsonl, the captioned shard folders, prompts.txt and captions_report.json.
        captioner: image-to-text model folder or hub id in the local cache (Cap3D: Salesforce/blip2-opt-2.7b).
        llm: causal LM folder or hub id in the local cache that summarises the view captions.
        views: views captioned per object, spread evenly around it (Cap3D: 8).
        batch_size: objects per batch (the captioner gets batch_size x views images at a time).
        max_new_tokens: tokens the LLM writes per summary.
        dtype: models' weights dtype; `auto`: bfloat16 on a GPU, float32 on the CPU.
        allow_download: let transformers download the models from the Hugging Face Hub.
        trainer: accelerator, devices, num_nodes and strategy of the Trainer.
        progress: show progress bars.
    """
    local_only = not allow_download
    # fail on a missing model before reading any shard
    resolve_captioner(captioner, local_only)
    resolve_model(llm, local_only, option="--llm")
    def weights_dtype(device: torch.device) -> torch.dtype:
        return DTYPES[dtype if dtype != "auto" else "float32" if device.type == "cpu" else "bfloat16"]

    def load_captioner(device: torch.device) -> ViewCaptioner:
        return ViewCaptioner.from_pretrained(captioner, device, weights_dtype(device), local_only)

    def load_summarizer(device: torch.device) -> CaptionSummarizer:
        return CaptionSummarizer.from_pretrained(llm, device, weights_dtype(device), local_only,
                                                 max_new_tokens=max_new_tokens)

    runner = predict_trainer(trainer.accelerator, trainer.devices, trainer.num_nodes, trainer.strategy, progress)
    report = caption_shards(shards, out, load_captioner, load_summarizer, views=views, batch_size=batch_size,
                            trainer=runner, progress=progress, models={"captioner": str(captioner), "llm": str(llm)})
    if not runner.is_global_zero:
        return report
    samples = ", ".join(f"{count} samples in {Path(out) / name}" for name, count in report["samples"].items())
    print(f"{report['objects']} objects captioned ({report['captioned_this_run']} this run, {report['fallbacks']} "
          f"from a view caption) in {Path(out) / CAPTIONS_FILE}; {samples}")
    return report
