"""Generate orbit videos with a video model and write them as shards (source "synthetic").

Inputs are condition images with prompts, from
- a folder: every image, with its prompt in a `.txt` file of the same stem beside it (empty when absent);
- a `.jsonl` file: one object per line, {"image": path, "prompt": str, "id": optional key};
- a `.csv` file with columns image, prompt and optionally id.
Relative image paths are relative to the file. Each sample's key is its id (or the image's stem), its seed is
derived from the run seed and the key, so a resumed or re-batched run makes the same video.
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
from tqdm.auto import tqdm

from vfusion3d_lightning.data.preprocess import IMAGE_SUFFIXES, preprocess
from vfusion3d_lightning.data.render_shards import sample_key
from vfusion3d_lightning.data.schema import MultiViewSample, ShardJobReport, ShardWriter, resume_shard_folder
from vfusion3d_lightning.io import folder_lock, read_jsonl, to_uint8_images
from vfusion3d_lightning.models.video import OrbitVideoPipeline, SamplerSettings, VideoDiffusionModel

REPORT_NAME = "generate_report.json"


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


def _sample(item: GenerationInput, frames: torch.Tensor, seed: int, settings: SamplerSettings,
            model_name: str) -> MultiViewSample:
    rgb = to_uint8_images(frames)
    alpha = np.full(rgb.shape[:-1] + (1,), 255, dtype=np.uint8)  # masks are made by curation
    num_frames = rgb.shape[0]
    return MultiViewSample(
        key=item.key, object_id=item.key, source="synthetic", images=np.concatenate([rgb, alpha], -1),
        azimuths=np.arange(num_frames, dtype=np.float32) * (2 * math.pi / num_frames),
        prompt=item.prompt,
        extra={"seed": seed, "sampler": settings.to_dict(), "video_model": model_name,
               "condition_image": str(item.image)})


def generate_shards(model: VideoDiffusionModel, inputs: list[GenerationInput], out_dir: str | Path,
                    settings: SamplerSettings | None = None, frame_size: int = 256, batch_size: int = 4,
                    seed: int = 0, shard_size: int = 64, border_ratio: float | None = 0.2, background: str = "auto",
                    model_name: str = "", progress: bool = True) -> ShardJobReport:
    """Generate a video per input into `out_dir/shard-NNNNNN.tar`. Keys already in complete shards are
    skipped; a killed run leaves only `.tar.partial` files, removed here, so its samples are made again."""
    settings = settings or SamplerSettings()
    out_dir = Path(out_dir)
    with folder_lock(out_dir, "generate"):
        return _generate_shards(model, inputs, out_dir, settings, frame_size, batch_size, seed, shard_size,
                                border_ratio, background, model_name, progress)


def _generate_shards(model: VideoDiffusionModel, inputs: list[GenerationInput], out_dir: Path,
                     settings: SamplerSettings, frame_size: int, batch_size: int, seed: int, shard_size: int,
                     border_ratio: float | None, background: str, model_name: str,
                     progress: bool) -> ShardJobReport:
    done = resume_shard_folder(out_dir)
    todo = [item for item in inputs if item.key not in done]
    report = ShardJobReport(skipped_existing=len(inputs) - len(todo))
    device = next(model.unet.parameters()).device
    pipe = OrbitVideoPipeline(model, settings)
    model.check_frames(settings.num_frames, frame_size, frame_size)
    with ShardWriter(out_dir, maxcount=shard_size) as writer, \
            tqdm(total=len(todo), desc="generate", unit="video", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for item in todo[start:start + batch_size]:
                try:
                    images.append(preprocess(item.image, frame_size, border_ratio, background))
                    batch.append(item)
                except (ValueError, FileNotFoundError, OSError) as err:
                    report.failed.append({"key": item.key, "image": str(item.image), "reason": str(err)})
                    tqdm.write(f"skipping {item.key}: {err}")
            if batch:
                seeds = [sample_seed(seed, item.key) for item in batch]
                videos = pipe(torch.stack(images).to(device), [item.prompt for item in batch], seeds, progress=False)
                for item, video, item_seed in zip(batch, videos, seeds):
                    writer.write_sample(_sample(item, video, item_seed, settings, model_name))
                    report.written += 1
            bar.update(len(todo[start:start + batch_size]))
    report.shards = [str(p) for p in writer.written]
    report.save(out_dir / REPORT_NAME)
    return report
