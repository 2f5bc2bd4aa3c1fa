"""`vfusion3d-lightning prompts`: keep the captions an LLM judges to describe a single object (resumable)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vfusion3d_lightning.commands.common import DTYPES, resolve_device
from vfusion3d_lightning.data.prompts import (
    DROP_REASONS,
    PROMPTS_FILE,
    SingleObjectClassifier,
    curate_prompts,
    resolve_model,
)


def prompts(captions: list[Path], model: str, out: Path, field: str = "caption", batch_size: int = 8,
            max_new_tokens: int = 4, min_words: int = 2, max_words: int = 40, device: str = "auto",
            dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto", allow_download: bool = False) -> dict:
    """Normalise and de-duplicate captions, then keep those a local causal LM answers "single object" to, in
    a few-shot prompt. Each decision is appended to decisions.jsonl as it is made, so a killed run resumes;
    prompts.txt holds the kept prompts and prompts_report.json the counts.

    Args:
        captions: caption files: .txt (a line each), .jsonl or .csv.
        model: causal LM folder or hub id in the local cache (the paper: meta-llama/Llama-2-13b-chat-hf).
        out: folder for decisions.jsonl, prompts.txt and prompts_report.json.
        field: JSONL field / CSV column of the caption.
        batch_size: captions per generate call.
        max_new_tokens: tokens generated per answer.
        min_words: drop shorter captions.
        max_words: drop longer captions.
        device: `auto` (the GPU if any), `cpu`, `cuda`, `cuda:N`.
        dtype: model weights dtype; `auto`: bfloat16 on a GPU, float32 on the CPU.
        allow_download: let transformers download `model` from the Hugging Face Hub.
    """
    local_only = not allow_download
    resolve_model(model, local_only)  # fail on a missing model before reading any caption
    device = resolve_device(device)
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"

    def load() -> SingleObjectClassifier:
        return SingleObjectClassifier.from_pretrained(model, device, DTYPES[dtype], local_only,
                                                      max_new_tokens=max_new_tokens)

    report = curate_prompts(captions, out, load, field=field, batch_size=batch_size, min_words=min_words,
                            max_words=max_words, model_name=str(model))
    counts = report["captions"]
    dropped = ", ".join(f"{counts[r]} {r.replace('_', ' ')}" for r in DROP_REASONS)
    print(f"read {counts['read']} captions ({dropped}); {counts['unique']} unique: {report['single_object']} single "
          f"object, {report['not_single_object']} not, {report['unparsed']} unparsed ({report['decided_this_run']} "
          f"decided this run) -> {report['prompts']} prompts in {Path(out) / PROMPTS_FILE}")
    return report
