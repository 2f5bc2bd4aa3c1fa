"""The one WebDataset sample schema for multi-view data, with a validating reader and a shard writer.

A sample is the files of one tar that share a key (no dots in the key):

    <key>.json          metadata (below)
    <key>.000.png       view 0 as RGBA PNG, or
    <key>.000.jpg       view 0 as RGB JPEG plus
    <key>.000.mask.png  its foreground mask (8-bit L PNG)
    <key>.001.png ...   views 1 .. N-1, three digits

The JSON holds
    schema        "vfusion3d-multiview/1"
    object_id     str, the asset or video id
    source        "3d" (renders of 3D assets) or "synthetic" (generated videos)
    num_views     N
    width, height view size in pixels
    image_format  "png" or "jpg"
    cam2world     N 4x4 cam-to-world matrices (OpenGL camera, world +z up: see cameras.py) or null
    intrinsics    N 3x3 pixel intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] or null
    elevations    N elevations in radians or null
    azimuths      N azimuths in radians or null
    prompt        str or null
    quality       float or null (quality-classifier score)
and may hold more keys, which are kept in `MultiViewSample.extra`.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

SCHEMA_VERSION = "vfusion3d-multiview/1"
SOURCES = ("3d", "synthetic")
IMAGE_FORMATS = ("png", "jpg")
_CORE_KEYS = {"schema", "object_id", "source", "num_views", "width", "height", "image_format", "cam2world",
              "intrinsics", "elevations", "azimuths", "prompt", "quality"}


class SampleError(ValueError):
    """A shard sample that does not follow the schema; the message names the sample and the problem."""


class ShardError(SampleError):
    """A shard that is not a whole tar: cut short by a kill or a full disk, or another file."""


@dataclass
class MultiViewSample:
    """One object's views. images (N, H, W, 4) uint8 RGBA; cam2world (N, 4, 4); intrinsics (N, 3, 3) pixels."""

    key: str
    object_id: str
    source: str
    images: np.ndarray
    cam2world: np.ndarray | None = None
    intrinsics: np.ndarray | None = None
    elevations: np.ndarray | None = None
    azimuths: np.ndarray | None = None
    prompt: str | None = None
    quality: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_views(self) -> int:
        return self.images.shape[0]

    @property
    def has_cameras(self) -> bool:
        return self.cam2world is not None and self.intrinsics is not None


def view_name(index: int, suffix: str) -> str:
    return f"{index:03d}.{suffix}"


def _encode_image(array: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)  # fast; PNG size barely shrinks at higher levels
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _as_list(array: np.ndarray | None):
    return None if array is None else np.asarray(array, dtype=np.float64).tolist()


def encode_sample(sample: MultiViewSample, image_format: str = "png", jpeg_quality: int = 95) -> dict[str, Any]:
    """MultiViewSample -> a webdataset sample dict (file suffix -> bytes), validated first."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    _check_sample(sample, sample.key)
    n, height, width, _ = sample.images.shape
    meta = {
        **sample.extra,
        "schema": SCHEMA_VERSION,
        "object_id": sample.object_id,
        "source": sample.source,
        "num_views": n,
        "width": width,
        "height": height,
        "image_format": image_format,
        "cam2world": _as_list(sample.cam2world),
        "intrinsics": _as_list(sample.intrinsics),
        "elevations": _as_list(sample.elevations),
        "azimuths": _as_list(sample.azimuths),
        "prompt": sample.prompt,
        "quality": sample.quality,
    }
    out: dict[str, Any] = {"__key__": sample.key, "json": json.dumps(meta).encode()}
    for i, view in enumerate(sample.images):
        if image_format == "png":
            out[view_name(i, "png")] = _encode_image(view, "png")
        else:
            out[view_name(i, "jpg")] = _encode_image(np.ascontiguousarray(view[..., :3]), "jpg", jpeg_quality)
            out[view_name(i, "mask.png")] = _encode_image(np.ascontiguousarray(view[..., 3]), "png")
    return out


def _decode_image(data: bytes, key: str, name: str, mode: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image.convert(mode))
    except Exception as err:  # PIL raises many types for truncated or foreign data
        raise SampleError(f"sample {key!r}: view file {name} cannot be decoded ({err})") from err


def _array(meta: dict, name: str, shape: tuple[int, ...], where: str) -> np.ndarray | None:
    value = meta.get(name)
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise SampleError(f"sample {where}: {name} is not numeric ({err})") from err
    if array.shape != shape:
        raise SampleError(f"sample {where}: {name} has shape {array.shape}, expected {shape}")
    return array


def _subset(array: np.ndarray | None, indices: list[int]) -> np.ndarray | None:
    return None if array is None else array[indices]


def _check_sample(sample: MultiViewSample, key: str, where: str | None = None) -> None:
    where = where or repr(key)  # the sample, and its shard where known
    if not key or "." in key:
        raise SampleError(f"sample key {key!r} must be non-empty and contain no dots (webdataset splits at dots)")
    if sample.source not in SOURCES:
        raise SampleError(f"sample {where}: source is {sample.source!r}, expected one of {SOURCES}")
    images = sample.images
    if images.ndim != 4 or images.shape[-1] != 4 or images.dtype != np.uint8 or images.shape[0] < 1:
        raise SampleError(f"sample {where}: images must be (N, H, W, 4) uint8 RGBA, got {images.shape} {images.dtype}")
    n = images.shape[0]
    for name, array, shape in (("cam2world", sample.cam2world, (n, 4, 4)), ("intrinsics", sample.intrinsics, (n, 3, 3)),
                               ("elevations", sample.elevations, (n,)), ("azimuths", sample.azimuths, (n,))):
        if array is None:
            continue
        if np.shape(array) != shape:
            raise SampleError(f"sample {where}: {name} has shape {np.shape(array)}, expected {shape}")
        if not np.isfinite(array).all():
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(np.asarray(array)))[:, 0]})
            raise SampleError(f"sample {where}: {name} holds NaN or inf (views {bad})")
    if sample.cam2world is not None:
        if not np.allclose(sample.cam2world[:, 3], [0, 0, 0, 1], atol=1e-5):
            raise SampleError(f"sample {where}: cam2world matrices must end in the row [0, 0, 0, 1]")
        rotation = np.asarray(sample.cam2world)[:, :3, :3]
        error = np.abs(rotation @ rotation.transpose(0, 2, 1) - np.eye(3)).max()
        if error > 1e-3:
            raise SampleError(f"sample {where}: cam2world rotations are not orthonormal (error {error:.2g})")
    if sample.intrinsics is not None and (
            (sample.intrinsics[:, 0, 0] <= 0).any() | (sample.intrinsics[:, 1, 1] <= 0).any()):
        raise SampleError(f"sample {where}: intrinsics need positive focal lengths")
    if sample.quality is not None and not math.isfinite(sample.quality):
        raise SampleError(f"sample {where}: quality is {sample.quality}")


def decode_sample(raw: dict[str, Any], require_cameras: bool = False,
                  select: Callable[[int], Sequence[int]] | None = None) -> MultiViewSample:
    """A webdataset sample dict (suffix -> bytes) -> validated MultiViewSample, or SampleError saying why not.

    `select(num_views)` -> view indices decodes only those views, in that order (per-view cameras and
    angles follow): training uses a few of an object's views, and image decoding is the cost.
    """
    key = raw.get("__key__", "<unknown>")
    where = f"{key!r}" + (f" in {raw['__url__']}" if "__url__" in raw else "")
    if "json" not in raw:
        raise SampleError(f"sample {where}: missing its .json metadata (files present: {sorted(raw)})")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(f"sample {where}: .json is not valid JSON ({err})") from err
    if meta.get("schema") != SCHEMA_VERSION:
        raise SampleError(f"sample {where}: schema is {meta.get('schema')!r}, expected {SCHEMA_VERSION!r}")
    missing = [name for name in ("object_id", "source", "num_views", "width", "height", "image_format")
               if name not in meta]
    if missing:
        raise SampleError(f"sample {where}: metadata lacks {missing}")
    n, fmt = meta["num_views"], meta["image_format"]
    if not isinstance(n, int) or n < 1:
        raise SampleError(f"sample {where}: num_views must be a positive integer, got {n!r}")
    if fmt not in IMAGE_FORMATS:
        raise SampleError(f"sample {where}: image_format is {fmt!r}, expected one of {IMAGE_FORMATS}")
    needed = [view_name(i, s) for i in range(n) for s in (("png",) if fmt == "png" else ("jpg", "mask.png"))]
    absent = [name for name in needed if name not in raw]
    if absent:
        raise SampleError(f"sample {where}: missing view files {absent[:6]}{' ...' if len(absent) > 6 else ''}")
    try:
        indices = list(range(n)) if select is None else [int(i) for i in select(n)]
    except ValueError as err:
        raise SampleError(f"sample {where}: {err}") from err
    if not indices or min(indices) < 0 or max(indices) >= n:
        raise SampleError(f"sample {where}: selected views {indices} are not within its {n} views")
    views = []
    for i in indices:
        if fmt == "png":
            view = _decode_image(raw[view_name(i, "png")], key, view_name(i, "png"), "RGBA")
        else:
            rgb = _decode_image(raw[view_name(i, "jpg")], key, view_name(i, "jpg"), "RGB")
            mask = _decode_image(raw[view_name(i, "mask.png")], key, view_name(i, "mask.png"), "L")
            if mask.shape != rgb.shape[:2]:
                raise SampleError(f"sample {where}: view {i} mask is {mask.shape}, image is {rgb.shape[:2]}")
            view = np.concatenate([rgb, mask[..., None]], axis=-1)
        if view.shape[:2] != (meta["height"], meta["width"]):
            raise SampleError(f"sample {where}: view {i} is {view.shape[1]}x{view.shape[0]} pixels, metadata says "
                              f"{meta['width']}x{meta['height']}")
        views.append(view)
    sample = MultiViewSample(
        key=key,
        object_id=str(meta["object_id"]),
        source=meta["source"],
        images=np.stack(views),
        cam2world=_subset(_array(meta, "cam2world", (n, 4, 4), where), indices),
        intrinsics=_subset(_array(meta, "intrinsics", (n, 3, 3), where), indices),
        elevations=_subset(_array(meta, "elevations", (n,), where), indices),
        azimuths=_subset(_array(meta, "azimuths", (n,), where), indices),
        prompt=meta.get("prompt"),
        quality=None if meta.get("quality") is None else float(meta["quality"]),
        extra={k: v for k, v in meta.items() if k not in _CORE_KEYS},
    )
    _check_sample(sample, key, where)
    if require_cameras and not sample.has_cameras:
        raise SampleError(f"sample {where}: has no cameras (cam2world/intrinsics null); label it first")
    return sample


def unreadable_shard(path: str | Path, err: Exception) -> ShardError:
    """The error for a shard that is not a whole tar, naming it and what to do."""
    # webdataset appends the stream and the url to a tar error's args: the first is the reason
    reason = err.args[0] if isinstance(err, tarfile.TarError) and err.args else err
    return ShardError(f"shard {path} cannot be read ({type(err).__name__}: {reason}); write it again or move it "
                       "out of the folder, then rerun")


def read_raw_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """The samples of one shard file as stored (suffix -> bytes, and `__key__`), in order, undecoded.

    All of the file, in any process: `wds.WebDataset` would split its shard list over DataLoader workers and
    refuse to run under more than one rank, so a worker or rank reading a shard of its own got nothing or failed.
    """
    samples = wds.tarfile_samples(iter([{"url": os.fspath(path)}]))
    while True:
        try:
            raw = next(samples)
        except StopIteration:
            return
        except tarfile.TarError as err:
            raise unreadable_shard(path, err) from err
        yield raw


def read_samples(paths: Sequence[str | Path], select: Callable[[int], Sequence[int]] | None = None,
                 require_cameras: bool = False) -> Iterator[MultiViewSample]:
    """The validated samples of these shard files, in order (`select` and `require_cameras` as decode_sample)."""
    for path in paths:
        for raw in read_raw_samples(path):
            yield decode_sample(raw, require_cameras, select)


@dataclass
class ShardJobReport:
    """What a job that writes one sample per input into shards did (render, generate); saved beside the shards.

    Args:
        written: samples written in this run.
        skipped_existing: inputs already in complete shards from an earlier run.
        failed: one `{"asset" or "key": ..., "reason": ...}` per input that could not be made.
        shards: the shard files written in this run.
    """

    written: int = 0
    skipped_existing: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        from dataclasses import asdict

        from vfusion3d_lightning.io import atomic_write

        text = json.dumps(asdict(self), indent=2, default=str)
        atomic_write(path, lambda tmp: tmp.write_text(text))


class ShardWriter(wds.ShardWriter):
    """webdataset's ShardWriter that writes `<prefix>-NNNNNN.tar` atomically.

    Each shard is written as `.tar.partial` and renamed when complete, so a killed job never leaves a
    truncated shard under a final name; an error while a sample is being written (a full disk) discards the
    unfinished shard, one between samples publishes it; numbering continues after the shards already in
    `directory`.
    """

    def __init__(self, directory: str | Path, prefix: str = "shard", maxcount: int = 1000, maxsize: float = 1e9,
                 image_format: str = "png"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.image_format = image_format
        start = 1 + max((shard_index(p) for p in complete_shards(self.directory, prefix)), default=-1)
        super().__init__(str(self.directory / f"{prefix}-%06d.tar.partial"), maxcount=maxcount, maxsize=maxsize,
                         start_shard=start, verbose=0, post=self._publish)
        self.written: list[Path] = []

    def _publish(self, partial: str) -> None:
        final = partial[: -len(".partial")]
        os.replace(partial, final)
        self.written.append(Path(final))

    def finish(self) -> None:
        if self.tarstream is not None and self.count == 0:  # never publish an empty shard
            self.tarstream.close()
            os.remove(self.fname)
            self.tarstream = None
            return
        super().finish()

    def write_sample(self, sample: MultiViewSample) -> None:
        self.write(encode_sample(sample, self.image_format))

    def write(self, obj: dict[str, Any]) -> None:
        self._writing = True  # until the sample is whole in the tar
        super().write(obj)
        self._writing = False

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None or not getattr(self, "_writing", False):
            self.close()  # every sample in the open shard is whole: publish it
            return
        # the error came while a sample was being written (a full disk): the shard may end in a cut sample,
        # so it is dropped instead of published; a resumed job makes its samples again
        if self.tarstream is not None:
            try:
                self.tarstream.close()
            except OSError:
                pass
            self.tarstream = None
            Path(self.fname).unlink(missing_ok=True)


def shard_index(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1].split(".")[0])


def complete_shards(directory: str | Path, prefix: str = "shard") -> list[Path]:
    return sorted(Path(directory).glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def keys_in_shards(paths: list[Path]) -> dict[Path, list[str]]:
    """The sample keys of each tar, from its member names only (no image decoding)."""
    keys = {}
    for path in paths:
        seen: dict[str, None] = {}
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile():
                        seen.setdefault(os.path.basename(member.name).split(".", 1)[0], None)
        except tarfile.TarError as err:  # a cut shard under a final name would otherwise fail without its name
            raise unreadable_shard(path, err) from err
        keys[path] = list(seen)
    return keys


def resume_shard_folder(directory: str | Path, prefix: str = "shard") -> set[str]:
    """Prepare `directory` for a resumable job: remove `.tar.partial` files a killed run left (their samples
    are made again) and return the keys already in complete shards (skipped)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{prefix}-*.tar.partial"):
        stale.unlink()
    return {key for keys in keys_in_shards(complete_shards(directory, prefix)).values() for key in keys}
