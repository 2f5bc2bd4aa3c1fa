"""`vfusion3d-lightning infer`: images -> turntable videos and meshes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from vfusion3d_lightning.commands.common import DTYPES, resolve_device
from vfusion3d_lightning.data.preprocess import IMAGE_SUFFIXES
from vfusion3d_lightning.inference import ImageTo3D, save_outputs
from vfusion3d_lightning.models.lrm import LRM


def input_images(source: Path) -> list[Path]:
    """An image file, or the images in a folder (sorted)."""
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {source}")
        return images
    if not source.is_file():
        raise FileNotFoundError(f"input {source} is neither an image file nor a folder")
    return [source]


def infer(input: Path, out: Path, checkpoint: str = "vfusion3d", frames: int = 160, render_size: int = 384,
          frames_per_batch: int = 8, fps: int = 40, video_format: Literal["mp4", "gif", "none"] = "mp4",
          mesh_format: Literal["glb", "obj", "ply", "none"] = "glb", mesh_resolution: int = 512,
          mesh_threshold: float = 1.0, mesh_method: Literal["coarse_to_fine", "dense"] = "coarse_to_fine",
          input_size: int = 512, border_ratio: float = 0.2,
          background: Literal["auto", "rembg", "alpha", "white"] = "auto", device: str = "auto",
          dtype: Literal["float32", "bfloat16"] = "float32", compile: bool = False) -> list[Path]:
    """Reconstruct each image as a triplane; write its preprocessed input, a turntable video and a mesh.

    Args:
        input: an image, or a folder of images.
        out: folder; each image gets a subfolder named after it.
        checkpoint: a save_pretrained folder, a weights file, a registry name or an LRMModule .ckpt (default: the
            released model).
        frames: turntable frames.
        render_size: turntable frame size in pixels.
        frames_per_batch: turntable frames rendered per call (memory).
        fps: video frame rate.
        video_format: turntable file format, or `none`.
        mesh_format: mesh file format, or `none`.
        mesh_resolution: density grid size per axis for the mesh.
        mesh_threshold: density level of the surface (the released 1.0).
        mesh_method: `coarse_to_fine` queries the grid only near the surface; `dense` queries all of it.
        input_size: encoder input size in pixels.
        border_ratio: margin kept around the object when recentring.
        background: `auto`: the alpha channel if any, else rembg; `white`: objects on plain white.
        device: `auto` (the GPU if any), `cpu`, `cuda`, `cuda:N`.
        dtype: `bfloat16` runs the network under autocast.
        compile: torch.compile the network and renderer: minutes of compiling, then faster (GPU).
    """
    images = input_images(input)
    engine = ImageTo3D(LRM.from_pretrained(checkpoint), resolve_device(device), DTYPES[dtype], input_size,
                       border_ratio, background, compile=compile)
    video = None if video_format == "none" else video_format
    mesh = None if mesh_format == "none" else mesh_format
    written: list[Path] = []
    failed: list[str] = []
    for path in tqdm(images, desc="infer", unit="image", disable=len(images) == 1):
        try:
            result = engine.run(path, frames, render_size, frames_per_batch, mesh_resolution, mesh_threshold,
                                mesh_method, video=video is not None, mesh=mesh is not None)
        except (ValueError, OSError) as err:  # this image (unreadable, empty mask, no surface), not the run
            message = str(err) if str(path) in str(err) else f"{path}: {err}"
            if len(images) == 1:
                raise ValueError(message) from err
            tqdm.write(f"vfusion3d-lightning: skipped {' '.join(message.split())}", file=sys.stderr)
            failed.append(path.name)
            continue
        files = save_outputs(result, Path(out) / path.stem, video, mesh, fps)
        print(f"{path} -> " + ", ".join(str(p) for p in files))
        written += files
    if failed:
        raise ValueError(f"{len(failed)} of {len(images)} images in {input} failed ({', '.join(failed)}; each "
                         f"reason above); the others are in {out}")
    return written
