"""`vfusion3d-lightning infer`: images -> turntable videos and meshes."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from vfusion3d_lightning.commands.common import DTYPES, resolve_device
from vfusion3d_lightning.data.preprocess import IMAGE_SUFFIXES
from vfusion3d_lightning.inference import ImageTo3D, auto_settings
from vfusion3d_lightning.models.lrm import LRM

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


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


def infer(input: Path, out: Path, checkpoint: str = "vfusion3d", frames: int | None = None,
          render_size: int | None = None, frames_per_batch: int = 8, fps: int | None = None,
          video_format: Literal["mp4", "gif", "none"] = "mp4",
          mesh_format: Literal["glb", "obj", "ply", "none"] = "glb",
          mesh_resolution: int | None = None, mesh_threshold: float = 1.0,
          mesh_method: Literal["coarse_to_fine", "dense"] = "coarse_to_fine", texture_size: int | None = None,
          max_faces: int | None = None, unwrap: Literal["per_face", "xatlas"] = "per_face", input_size: int = 512,
          border_ratio: float = 0.2, background: Literal["auto", "rembg", "alpha", "white"] = "auto",
          device: str = "auto", dtype: Literal["float32", "bfloat16"] = "float32", compile: bool = False) -> list[Path]:
    """Reconstruct each image as a triplane; write its preprocessed input, a turntable video and a textured mesh.

    Settings left unset (null) are chosen by device: the released ones on a GPU, ones that finish in about two
    minutes on a CPU; the line `auto settings for <device>: ...` says which, and each flag overrides its own.

    Args:
        input: an image, or a folder of images.
        out: folder; each image gets a subfolder named after it.
        checkpoint: a save_pretrained folder, a weights file, a registry name or an LRMModule .ckpt (default: the
            released model).
        frames: turntable frames (auto: 160 on a GPU, 16 on a CPU).
        render_size: turntable frame size in pixels (auto: 384 on a GPU, 64 on a CPU).
        frames_per_batch: turntable frames rendered per call (memory).
        fps: video frame rate (auto: 40 on a GPU, 8 on a CPU).
        video_format: turntable file format, or `none`.
        mesh_format: `glb` (texture inside), `obj` (+ .mtl + .png), `ply` (vertex colours), or `none`.
        mesh_resolution: density grid size per axis for the mesh (auto: 512 on a GPU, 128 on a CPU).
        mesh_threshold: density level of the surface (the released 1.0); with no surface there, the input and
            turntable are kept and a warning suggests a level that has one.
        mesh_method: `coarse_to_fine` queries the grid only near the surface; `dense` queries all of it.
        texture_size: side in texels of the baked base-colour texture; 0 keeps vertex colours (auto: 1024 on a
            GPU, 512 on a CPU).
        max_faces: the mesh is decimated to at most this many faces before it is unwrapped and textured (auto:
            30000 on a GPU, 20000 on a CPU).
        unwrap: `per_face`: each face its own texels (milliseconds); `xatlas`: charts of connected faces, which
            texture painters edit more easily (seconds: 4 s for 30k faces).
        input_size: encoder input size in pixels.
        border_ratio: margin kept around the object when recentring.
        background: `auto`: the alpha channel if any, else rembg; `white`: objects on plain white.
        device: `auto` (the GPU if any), `cpu`, `cuda`, `cuda:N`.
        dtype: `bfloat16` runs the network under autocast.
        compile: torch.compile the network and renderer: minutes of compiling, then faster (GPU).
    """
    options = {name: value for name, value in locals().items() if name not in ("input", "out")}  # the settings
    images = input_images(input)
    return reconstruct({path: Path(out) / path.stem for path in images}, f"{input}", **options)


def reconstruct(images: dict[Path, Path], source: str, checkpoint: str = "vfusion3d", frames: int | None = None,
                render_size: int | None = None, frames_per_batch: int = 8, fps: int | None = None,
                video_format: str = "mp4", mesh_format: str = "glb", mesh_resolution: int | None = None,
                mesh_threshold: float = 1.0, mesh_method: str = "coarse_to_fine", texture_size: int | None = None,
                max_faces: int | None = None, unwrap: str = "per_face", input_size: int = 512,
                border_ratio: float = 0.2, background: str = "auto", device: str = "auto", dtype: str = "float32",
                compile: bool = False) -> list[Path]:
    """What `infer` does for each image: image path -> its output folder; `source` names them in messages.
    The other arguments are `infer`'s (see there). Returns the files written."""
    device = resolve_device(device)
    given = {"frames": frames, "render_size": render_size, "fps": fps, "mesh_resolution": mesh_resolution,
             "texture_size": texture_size, "max_faces": max_faces}
    settings = {name: auto if given[name] is None else given[name] for name, auto in auto_settings(device).items()}
    chosen = [f"--{name} {value}" for name, value in settings.items() if given[name] is None]
    if chosen:
        print(f"vfusion3d-lightning: auto settings for {device}: {' '.join(chosen)} (pass a flag to override it)",
              file=sys.stderr)
    engine = ImageTo3D(LRM.from_pretrained(checkpoint), device, DTYPES[dtype], input_size,
                       border_ratio, background, compile=compile)
    video = None if video_format == "none" else video_format
    mesh = None if mesh_format == "none" else mesh_format
    written: list[Path] = []
    failed: list[str] = []

    def note(line: str) -> None:
        tqdm.write(f"vfusion3d-lightning: {line}", file=sys.stderr)

    for path, out_dir in tqdm(images.items(), desc="infer", unit="image", disable=len(images) == 1):
        try:
            result = engine.run(path, settings["frames"], settings["render_size"], frames_per_batch,
                                settings["mesh_resolution"], mesh_threshold, mesh_method, video=video is not None,
                                mesh=mesh is not None, texture_size=settings["texture_size"],
                                max_faces=settings["max_faces"], unwrap=unwrap, out_dir=out_dir,
                                video_format=video or "mp4", mesh_format=mesh or "glb", fps=settings["fps"],
                                progress=True, log=note)
        except (ValueError, OSError) as err:  # this image (unreadable, empty mask), not the run
            if isinstance(err, OSError) and err.errno in DISK_FULL:  # no later image could be written either
                raise
            message = str(err) if str(path) in str(err) else f"{path}: {err}"
            if len(images) == 1:
                raise ValueError(message) from err
            note(f"skipped {' '.join(message.split())}")
            failed.append(path.name)
            continue
        if result.warning:  # the outputs before the mesh are written; only the mesh is missing
            note(f"warning: {path}: no mesh written: {result.warning} (--mesh_threshold)")
        print(f"{path} -> " + ", ".join(str(p) for p in result.files))
        written += result.files
    if failed:
        raise ValueError(f"{len(failed)} of {len(images)} images in {source} failed ({', '.join(failed)}; each "
                         f"reason above); the others are in "
                         f"{', '.join(sorted({str(folder.parent) for folder in images.values()}))}")
    return written
