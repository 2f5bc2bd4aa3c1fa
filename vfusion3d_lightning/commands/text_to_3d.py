"""`vfusion3d-lightning text-to-3d`: a prompt -> an image (text-to-image model) -> turntable video and mesh."""

from __future__ import annotations

import gc
import inspect
import re
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from vfusion3d_lightning.commands.common import DTYPES, resolve_device
from vfusion3d_lightning.commands.infer import infer, reconstruct
from vfusion3d_lightning.data.first_frames import DEFAULT_SUFFIX, ImageSettings, load_text_to_image, render_images
from vfusion3d_lightning.io import atomic_write

IMAGE_FILE, PROMPT_FILE = "image.png", "prompt.txt"
# text_to_3d's arguments that go to infer's reconstruction as they are
_INFER_OPTIONS = [name for name in inspect.signature(reconstruct).parameters if name not in ("images", "source")]


def slug(prompt: str, length: int = 60) -> str:
    """A folder name from a prompt: lower-case words joined by '-', at most `length` characters."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:length].rstrip("-") or "prompt"


def text_to_3d(prompt: str, t2i: str, checkpoint: str = "vfusion3d", out: Path = Path("outputs/text_to_3d"),
               suffix: str = DEFAULT_SUFFIX, negative_prompt: str = "", steps: int = 30, guidance: float = 7.5,
               image_size: int = 512, seed: int = 0,
               t2i_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto", allow_download: bool = False,
               frames: int | None = None, render_size: int | None = None, frames_per_batch: int = 8,
               fps: int | None = None, video_format: Literal["mp4", "gif", "none"] = "mp4",
               mesh_format: Literal["glb", "obj", "ply", "none"] = "glb", mesh_resolution: int | None = None,
               mesh_threshold: float = 1.0, mesh_method: Literal["coarse_to_fine", "dense"] = "coarse_to_fine",
               texture_size: int | None = None, max_faces: int | None = None,
               unwrap: Literal["per_face", "xatlas"] = "per_face", input_size: int = 512,
               border_ratio: float = 0.2, background: Literal["auto", "rembg", "alpha", "white"] = "white",
               device: str = "auto", dtype: Literal["float32", "bfloat16"] = "float32",
               compile: bool = False) -> list[Path]:
    """Make an image of `prompt` with a text-to-image model (as the `images` command does), then reconstruct it
    as `infer` does: out/<prompt slug>/ gets image.png and prompt.txt, then input.png, the turntable video and
    the textured mesh. The LRM's and the outputs' settings are `infer`'s; those left unset (null) are chosen
    by device, as for `infer`.

    Args:
        prompt: what to make, e.g. "a red wooden chair".
        t2i: a text-to-image pipeline folder (model_index.json) or a Hub id in the local cache (a good default:
            stabilityai/stable-diffusion-xl-base-1.0).
        out: folder; the prompt gets a subfolder named after it.
        suffix: appended to the prompt the text-to-image model sees ("" for none).
        negative_prompt: what the image should not show ("" for none).
        steps: text-to-image denoising steps.
        guidance: text-to-image classifier-free guidance scale.
        image_size: text-to-image side in pixels (a multiple of 8).
        seed: text-to-image seed (with the prompt, it fixes the image).
        t2i_dtype: text-to-image weights dtype; `auto`: bfloat16 on a GPU, float32 on the CPU.
        allow_download: let diffusers download `t2i` from the Hugging Face Hub.
        background: `white` (default: the suffix asks for a plain white background; needs no extra model),
            `rembg` or `auto` (rembg, with its model present locally) for a cut-out.
    """
    options = {name: value for name, value in locals().items() if name in _INFER_OPTIONS}
    settings = ImageSettings(suffix=suffix, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                             size=image_size, seed=seed)
    settings.check()
    if not prompt.strip():
        raise ValueError("the prompt is empty; say what to make, e.g. --prompt 'a red wooden chair'")
    device = resolve_device(device)
    if t2i_dtype == "auto":
        t2i_dtype = "float32" if device == "cpu" else "bfloat16"
    folder = Path(out) / slug(prompt)
    pipeline = load_text_to_image(t2i, device, DTYPES[t2i_dtype], local_files_only=not allow_download)
    with torch.no_grad():
        picture = render_images(pipeline, [prompt.strip()], [0], settings, device)[0]
    del pipeline  # its memory goes back before the LRM loads
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    image = atomic_write(folder / IMAGE_FILE, lambda tmp: Image.fromarray(picture).save(tmp))
    text = atomic_write(folder / PROMPT_FILE, lambda tmp: tmp.write_text(prompt.strip() + "\n", "utf-8"))
    print(f"{prompt!r} -> {image}")
    return [image, text, *reconstruct({image: folder}, str(image), **{**options, "device": device})]


def _infer_argument_docs(names: set[str]) -> str:
    """The `Args:` lines of `infer` for `names`: the settings both commands take are described once, there."""
    lines, keep = [], False
    for line in (infer.__doc__ or "").splitlines():
        named = re.match(r" {8}(\w+): ", line)
        keep = named.group(1) in names if named else keep and line.startswith(" " * 12)
        if keep:
            lines.append(line)
    return "\n".join(lines) + "\n"


# jsonargparse reads each argument's help from here
text_to_3d.__doc__ = (text_to_3d.__doc__ or "").rstrip() + "\n" + _infer_argument_docs(set(_INFER_OPTIONS) - {
    "background"})
