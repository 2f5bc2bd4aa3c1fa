"""Generate orbit videos with a video model and write them as shards (source "synthetic").

Inputs are condition images with prompts, from
- a folder: every image, with its prompt in a `.txt` file of the same stem beside it (empty when absent);
- a `.jsonl` file: one object per line, {"image": path, "prompt": str, "id": optional key};
- a `.csv` file with columns image, prompt and optionally id.
Relative image paths are relative to the file. Each sample's key is its id (or the image's stem), its seed is
derived from the run seed and the key, so a resumed run makes the same video. The videos are made by
`training/generation.py` (Trainer.predict, a planned shard a step).
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vfusion3d_lightning.data.preprocess import IMAGE_SUFFIXES
from vfusion3d_lightning.data.render_shards import sample_key
from vfusion3d_lightning.data.schema import MultiViewSample
from vfusion3d_lightning.io import read_jsonl, to_uint8_images
from vfusion3d_lightning.models.video import SamplerSettings


@dataclass
class GenerationInput:
    key: str
    image: Path
    prompt: str


def _id_key(raw: str) -> str:
    """A webdataset-safe key from a user's id: no dots, nothing outside [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", raw)


def read_inputs(source: str | Path) -> list[GenerationInput]:
    """Condition images and prompts from a folder, a .jsonl or a .csv file (see the module docstring)."""
    source = Path(source)
    inputs: list[GenerationInput] = []
    if source.is_dir():
        for image in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            text = image.with_suffix(".txt")
            prompt = text.read_text().strip() if text.is_file() else ""
            inputs.append(GenerationInput(sample_key(image), image, prompt))
        if not inputs:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
    elif source.suffix.lower() in (".jsonl", ".csv") and source.is_file():
        if source.suffix.lower() == ".jsonl":
            rows = list(read_jsonl(source))
        else:
            with source.open(newline="") as handle:
                rows = list(enumerate(csv.DictReader(handle), 2))
        for number, row in rows:
            where = f"{source}:{number}"
            if not isinstance(row, dict) or not row.get("image"):
                raise ValueError(f"{where}: needs an 'image' field (and a 'prompt')")
            image = Path(row["image"]).expanduser()
            image = image if image.is_absolute() else source.parent / image
            if not image.is_file():
                raise FileNotFoundError(f"{where}: image {image} does not exist")
            key = _id_key(str(row["id"])) if row.get("id") else sample_key(image)
            inputs.append(GenerationInput(key, image, str(row.get("prompt") or "")))
    else:
        raise FileNotFoundError(f"inputs {source} must be a folder of images, a .jsonl or a .csv file")
    keys = [item.key for item in inputs]
    clashes = sorted({k for k in keys if keys.count(k) > 1})
    if clashes:
        raise ValueError(f"inputs map to the same sample key {clashes[:5]}; give them distinct ids or file names")
    return inputs


def sample_seed(run_seed: int, key: str) -> int:
    """A 31-bit seed from the run seed and the sample key (stable across runs, batches and machines)."""
    digest = hashlib.sha256(f"{run_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def generate_sample(item: GenerationInput, frames: torch.Tensor, seed: int, settings: SamplerSettings,
                    model_name: str) -> MultiViewSample:
    """The shard sample of one generated video (T, 3, H, W) in [0, 1]."""
    rgb = to_uint8_images(frames)
    alpha = np.full(rgb.shape[:-1] + (1,), 255, dtype=np.uint8)  # masks are made by curation
    num_frames = rgb.shape[0]
    return MultiViewSample(
        key=item.key, object_id=item.key, source="synthetic", images=np.concatenate([rgb, alpha], -1),
        azimuths=np.arange(num_frames, dtype=np.float32) * (2 * math.pi / num_frames),
        prompt=item.prompt,
        extra={"seed": seed, "sampler": settings.to_dict(), "video_model": model_name,
               "condition_image": str(item.image)})
