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
from vfusion3d_lightning.commands.infer import reconstruct
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
               texture_size: int | None = None, max_faces: int | None = None, input_size: int = 512,
               border_ratio: float = 0.2, background: Literal["auto", "rembg", "alpha", "white"] = "white",
               device: str = "auto", dtype: Literal["float32", "bfloat16"] = "float32",
               compile: bool = False) -> list[Path]:
    """Make an image of `prompt` with a text-to-image model (as the `images` command does), then reconstruct it
    as `infer` does: out/<prompt slug>/ gets image.png and prompt.txt, then input.png, the turntable video and
    the textured mesh. Settings left unset (null) are chosen by device, as for `infer`.

    Args:
        prompt: what to make, e.g. "a red wooden chair".
        t2i: a text-to-image pipeline folder (model_index.json) or a Hub id in the local cache (a good default:
            stabilityai/stable-diffusion-xl-base-1.0).
        checkpoint: the LRM: a save_pretrained folder, a weights file, a registry name or an LRMModule .ckpt.
        out: folder; the prompt gets a subfolder named after it.
        suffix: appended to the prompt the text-to-image model sees ("" for none).
        negative_prompt: what the image should not show ("" for none).
        steps: text-to-image denoising steps.
        guidance: text-to-image classifier-free guidance scale.
        image_size: text-to-image side in pixels (a multiple of 8).
        seed: text-to-image seed (with the prompt, it fixes the image).
        t2i_dtype: text-to-image weights dtype; `auto`: bfloat16 on a GPU, float32 on the CPU.
        allow_download: let diffusers download `t2i` from the Hugging Face Hub.
        frames: turntable frames (auto: 160 on a GPU, 16 on a CPU).
        render_size: turntable frame size in pixels (auto: 384 on a GPU, 64 on a CPU).
        frames_per_batch: turntable frames rendered per call (memory).
        fps: video frame rate (auto: 40 on a GPU, 8 on a CPU).
        video_format: turntable file format, or `none`.
        mesh_format: `glb` (texture inside), `obj` (+ .mtl + .png), `ply` (vertex colours), or `none`.
        mesh_resolution: density grid size per axis for the mesh (auto: 512 on a GPU, 128 on a CPU).
        mesh_threshold: density level of the surface; with no surface there, the image and turntable are kept and
            a warning suggests a level that has one.
        mesh_method: `coarse_to_fine` queries the grid only near the surface; `dense` queries all of it.
        texture_size: side in texels of the baked texture; 0 keeps vertex colours (auto: 1024 GPU, 512 CPU).
        max_faces: faces kept before unwrapping and texturing (auto: 30000 on a GPU, 20000 on a CPU).
        input_size: LRM encoder input size in pixels.
        border_ratio: margin kept around the object when recentring.
        background: `white` (default: the suffix asks for a plain white background; needs no extra model),
            `rembg` or `auto` (rembg, with its model present locally) for a cut-out.
        device: `auto` (the GPU if any), `cpu`, `cuda`, `cuda:N`.
        dtype: LRM dtype; `bfloat16` runs the network under autocast.
        compile: torch.compile the LRM and renderer: minutes of compiling, then faster (GPU).
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
