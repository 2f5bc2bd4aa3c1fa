"""Prompts -> first frames: one image per prompt from a diffusers text-to-image model, the condition images of
the video data engine (`generate --inputs FOLDER` reads the folder this writes).

The paper made first frames with Meta's internal EMU; a good public default is
`stabilityai/stable-diffusion-xl-base-1.0` (CreativeML Open RAIL++-M licence). Any diffusers text-to-image
pipeline loads: a `DiffusionPipeline` folder (model_index.json, as `hf download` or `save_pretrained` writes it)
or a Hub id in the local Hugging Face cache.

The output folder holds, per prompt `i`, `{i:06d}.png` and `{i:06d}.txt` (the prompt as given, without the
object-centric suffix the model sees), plus `images_report.json`. Each image's noise comes from a generator
seeded by (run seed, prompt, index) alone, so the same prompt at the same index gives the same image whatever the
batch size and whether the run resumed; a rerun skips prompts whose .png and .txt (holding the same prompt) both exist.
The images are made by `training/generation.py` (Trainer.predict, a batch of prompts a step).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vfusion3d_lightning.hub import is_hub_repo_id, missing_weights_error
from vfusion3d_lightning.io import atomic_write

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_SUFFIX = ", a single object centred on a plain white background, full view, studio lighting"
REPORT_FILE = "images_report.json"
PIPELINE_INDEX = "model_index.json"
# pipelines of diffusers' text-to-image mapping that need a condition image as well as the prompt
_NEEDS_IMAGE = ("Control", "Inpaint", "Kontext")


@dataclass
class ImageSettings:
    """How each first frame is made. `suffix` is appended to every prompt the model sees ("" for none);
    `negative_prompt` "" passes none; `size` is the side in pixels (a multiple of 8)."""

    suffix: str = DEFAULT_SUFFIX
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 7.5
    size: int = 512
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.size < 8 or self.size % 8:
            raise ValueError(f"need steps >= 1 and a size that is a positive multiple of 8, got steps={self.steps}, "
                             f"size={self.size}")


def text_to_image_classes() -> set[str]:
    """Class names of the diffusers pipelines that make an image from a prompt alone."""
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    names = {cls.__name__ for cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()}
    return {name for name in names if not any(word in name for word in _NEEDS_IMAGE)}


def _fetch_advice(source: str) -> tuple[str, str]:
    repo = source if is_hub_repo_id(source) else DEFAULT_MODEL
    target = f"checkpoints/{repo.split('/')[-1]}"
    return f"`hf download {repo} --local-dir {target}`", target


def resolve_pipeline(source: str | os.PathLike, local_files_only: bool = True) -> tuple[str, str]:
    """(what `DiffusionPipeline.from_pretrained` takes, the pipeline's class name) for a text-to-image model:
    a folder with model_index.json, or a Hub id (in the local Hugging Face cache unless `local_files_only` is
    False). A missing model is a one-line FileNotFoundError naming the `hf download` that fetches it; a pipeline
    of another kind (image-to-image, video) is a ValueError naming its class."""
    path = Path(source).expanduser()
    if path.is_dir():
        index = path / PIPELINE_INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{path} has no {PIPELINE_INDEX}, so it is no diffusers pipeline folder; pass "
                                    f"the folder that `hf download` or save_pretrained wrote (e.g. "
                                    f"{_fetch_advice(DEFAULT_MODEL)[0]})")
    elif is_hub_repo_id(str(source)):
        index = _cached_index(str(source))
        if index is None and local_files_only:
            command, target = _fetch_advice(str(source))
            raise missing_weights_error(f"text-to-image model {str(source)!r} (not in the local Hugging Face cache)",
                                        command, target, f"then pass --model {target}, or pass --allow_download "
                                        f"true to fetch {str(source)!r} from the hub")
        if index is None:  # downloading allowed: diffusers fetches it, and checks its class when it loads
            return str(source), ""
    else:
        command, target = _fetch_advice(DEFAULT_MODEL)
        raise missing_weights_error(f"text-to-image model {str(source)!r} (neither a folder nor a Hub id)",
                                    f"e.g. {DEFAULT_MODEL} with {command}", target, f"then pass --model {target}")
    name = json.loads(Path(index).read_text()).get("_class_name", "")
    _check_class(name, str(source))
    return str(path) if path.is_dir() else str(source), name


def _cached_index(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, PIPELINE_INDEX)
    except ValueError:  # not a valid Hub id, so certainly not cached
        return None
    return Path(found) if isinstance(found, str) else None


def _check_class(name: str, source: str) -> None:
    if name not in text_to_image_classes():
        raise ValueError(f"{source} is a {name or 'pipeline of unknown class'}, not a text-to-image pipeline; pass a "
                         f"text-to-image model such as {DEFAULT_MODEL}")


def load_text_to_image(source: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, local_files_only: bool = True):
    """A diffusers text-to-image pipeline on `device` in `dtype`, its progress bar off (ours counts prompts)."""
    from diffusers import DiffusionPipeline

    location, _ = resolve_pipeline(source, local_files_only)
    pipeline = DiffusionPipeline.from_pretrained(location, dtype=dtype, local_files_only=local_files_only)
    _check_class(type(pipeline).__name__, str(source))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def prompt_seed(run_seed: int, prompt: str, index: int) -> int:
    """A 63-bit seed from the run seed, the prompt and its index (stable across runs, batches and machines)."""
    digest = hashlib.sha256(f"{run_seed}\0{index}\0{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def stem(index: int) -> str:
    return f"{index:06d}"


def is_done(out_dir: Path, index: int, prompt: str) -> bool:
    """Whether prompt `index` has its .png and a .txt holding this prompt (an edited prompts file redoes it)."""
    text = out_dir / f"{stem(index)}.txt"
    return (out_dir / f"{stem(index)}.png").is_file() and text.is_file() and \
        text.read_text("utf-8").strip() == prompt.strip()


def render_images(pipeline, prompts: Sequence[str], indices: Sequence[int], settings: ImageSettings,
                  device: str | torch.device = "cpu") -> list[np.ndarray]:
    """One pipeline call for a batch: prompts (N strings) at their indices -> N uint8 (size, size, 3) images."""
    generators = [torch.Generator(device).manual_seed(prompt_seed(settings.seed, p, i))
                  for p, i in zip(prompts, indices, strict=True)]
    options = dict(num_inference_steps=settings.steps, guidance_scale=settings.guidance, height=settings.size,
                   width=settings.size, generator=generators, output_type="np")
    if settings.negative_prompt:
        options["negative_prompt"] = [settings.negative_prompt] * len(prompts)
    seen = [p.rstrip(" .,;") + settings.suffix if settings.suffix else p for p in prompts]  # no "chair., a"
    images = pipeline(seen, **options).images  # (N, H, W, 3) floats in [0, 1]
    return [(np.asarray(image, np.float32).clip(0, 1) * 255).round().astype(np.uint8) for image in images]


def write_first_frame(out_dir: Path, index: int, image: np.ndarray, prompt: str) -> None:
    """`<stem>.png` then `<stem>.txt`, each atomically: the .txt marks the pair finished."""
    atomic_write(out_dir / f"{stem(index)}.png", lambda tmp: Image.fromarray(image).save(tmp))
    atomic_write(out_dir / f"{stem(index)}.txt", lambda tmp: tmp.write_text(prompt + "\n", "utf-8"))
