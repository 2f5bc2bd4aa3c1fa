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
    num_views     N, a positive integer
    width, height view size in pixels, positive integers, width x height at most MAX_VIEW_PIXELS
    image_format  "png" or "jpg"
    cam2world     N 4x4 cam-to-world matrices (OpenGL camera, world +z up: see cameras.py) or null
    intrinsics    N 3x3 pixel intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] or null
    elevations    N elevations in radians or null
    azimuths      N azimuths in radians or null
    prompt        str or null
    quality       finite number or null (quality-classifier score)
and may hold more keys, which are kept in `MultiViewSample.extra`. One of them has a meaning here:
    mask_method   str, the method that estimated the alpha channel (written by `vfusion3d-lightning label`)
The alpha of a view is an exact coverage mask for source "3d" (a renderer's) and an estimated foreground mask
for a sample with `mask_method` or of source "synthetic" (generated videos, whose own alpha is all opaque): see
`has_estimated_masks`. Consumers use an estimated mask as a mask only, never to change the colours.
A view file may be any PNG mode (16-bit grey is scaled to 8 bits; palette or grey transparency is alpha); its
header's size must match width and height.
decode_sample turns every defect of a sample (a field of the wrong type included) into a SampleError naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import reprlib
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

SCHEMA_VERSION = "vfusion3d-multiview/1"
MASK_METHOD_KEY = "mask_method"  # metadata key: how the alpha channel was estimated
SOURCES = ("3d", "synthetic")
IMAGE_FORMATS = ("png", "jpg")
MAX_VIEW_PIXELS = 4096 * 4096  # a view's width x height; larger metadata is refused before any decoding
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


def has_estimated_masks(sample: MultiViewSample) -> bool:
    """Whether the sample's alpha channel is an estimated foreground mask rather than a renderer's exact coverage.

    Estimated: the metadata names a `mask_method` (`label` writes it, and has since it first wrote masks), or the
    source is "synthetic" (generated videos: their alpha is all opaque as generated, or a mask estimated later by
    any tool, so shards from before the key existed count too). Exact: a "3d" render with no `mask_method`.
    """
    return bool(sample.extra.get(MASK_METHOD_KEY)) or sample.source == "synthetic"


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


_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def has_alpha(image: Image.Image) -> bool:
    """Whether a PIL image carries transparency: an alpha band, or a transparent colour (palette, grey, RGB)."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def image_to_array(image: Image.Image, mode: str) -> np.ndarray:
    """A PIL image of any mode as uint8: (H, W, 4) for `mode` "RGBA", (H, W, 3) for "RGB", (H, W) for "L".

    `Image.convert` clips 16- and 32-bit integer images to 255 (a 16-bit grey PNG comes out white) and float
    images to 0/1, so these are scaled here: integers from 0..65535, floats from 0..1 (or 0..255 where they
    exceed 1); a transparent grey value becomes alpha. Palette, grey-alpha, CMYK, YCbCr ... go through
    `convert`, which keeps palette transparency. ValueError for values no 8-bit image can hold.
    """
    if mode not in ("RGBA", "RGB", "L"):
        raise ValueError(f"mode must be RGBA, RGB or L, got {mode!r}")
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return np.asarray(image.convert(mode))
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all():
            raise ValueError("the float image holds NaN or inf; save it as an 8- or 16-bit image")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            raise ValueError(f"the float image holds values {low:g} to {high:g}, outside 0..1 and 0..255; save it "
                             "as an 8- or 16-bit image")
        grey = np.round(values * (255 if high <= 1 else 1)).astype(np.uint8)
    else:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(f"the integer image holds values {low} to {high}, outside 16 bits (0..65535); save it "
                             "as an 8- or 16-bit image")
        grey = np.round(values.astype(np.float32) / 257).astype(np.uint8)  # 65535 -> 255
    if mode == "L":
        return grey
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if mode == "RGB":
        return rgb
    transparent = image.info.get("transparency")
    alpha = np.full(grey.shape, 255, np.uint8)
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha[values == transparent] = 0
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def _decode_view(data: bytes, where: str, view: int, name: str, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One view file -> uint8 array; its header's size is compared with the metadata's before any decoding, so
    a small file that declares a huge image (a decompression bomb) never reaches memory."""
    try:
        with warnings.catch_warnings():  # PIL warns above 89 Mpx; the size is checked against the metadata here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        with image:
            if image.size != size:
                raise SampleError(f"sample {where}: view {view} ({name}) is {image.size[0]}x{image.size[1]} "
                                  f"pixels, metadata says {size[0]}x{size[1]}; write the sample again")
            image.load()
            return image_to_array(image, mode)
    except (SampleError, MemoryError):
        raise
    except Exception as err:  # PIL raises many types for truncated or foreign data
        raise SampleError(f"sample {where}: view {view} file {name} cannot be decoded ({type(err).__name__}: "
                          f"{err}); write the sample again or move its shard out of the folder") from err


def _array(meta: dict, name: str, shape: tuple[int, ...], where: str) -> np.ndarray | None:
    value = meta.get(name)
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as err:
        raise SampleError(f"sample {where}: metadata field {name!r} is not numeric ({err}); expected {shape} "
                          "numbers or null") from err
    if array.shape != shape:
        raise SampleError(f"sample {where}: metadata field {name!r} has shape {array.shape}, expected {shape}")
    return array


def _subset(array: np.ndarray | None, indices: list[int]) -> np.ndarray | None:
    return None if array is None else array[indices]


def _views(mask: np.ndarray) -> list[int]:
    """The view numbers (first axis) where `mask` holds anywhere."""
    mask = np.asarray(mask)
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).tolist()


def _check_cameras(where: str, n: int, cam2world, intrinsics, elevations, azimuths) -> None:
    """Per-view arrays of n views; errors give the view numbers of these arrays."""
    for name, array, shape in (("cam2world", cam2world, (n, 4, 4)), ("intrinsics", intrinsics, (n, 3, 3)),
                               ("elevations", elevations, (n,)), ("azimuths", azimuths, (n,))):
        if array is None:
            continue
        if np.shape(array) != shape:
            raise SampleError(f"sample {where}: {name} has shape {np.shape(array)}, expected {shape}")
        if not np.isfinite(array).all():
            raise SampleError(f"sample {where}: {name} holds NaN or inf (views {_views(~np.isfinite(array))})")
    if cam2world is not None:
        cam2world = np.asarray(cam2world)
        row = np.abs(cam2world[:, 3] - [0, 0, 0, 1]) > 1e-5
        if row.any():
            raise SampleError(f"sample {where}: cam2world matrices must end in the row [0, 0, 0, 1] (views "
                              f"{_views(row)})")
        rotation = cam2world[:, :3, :3]
        error = np.abs(rotation @ rotation.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
        if (error > 1e-3).any():
            raise SampleError(f"sample {where}: cam2world rotations are not orthonormal (error {error.max():.2g}, "
                              f"views {_views(error > 1e-3)})")
    if intrinsics is not None:
        bad = (np.asarray(intrinsics)[:, 0, 0] <= 0) | (np.asarray(intrinsics)[:, 1, 1] <= 0)
        if bad.any():
            raise SampleError(f"sample {where}: intrinsics need positive focal lengths (views {_views(bad)})")


def _check_sample(sample: MultiViewSample, key: str, where: str | None = None) -> None:
    where = where or repr(key)  # the sample, and its shard where known
    if not key or "." in key:
        raise SampleError(f"sample key {key!r} must be non-empty and contain no dots (webdataset splits at dots)")
    if sample.source not in SOURCES:
        raise SampleError(f"sample {where}: source is {sample.source!r}, expected one of {SOURCES}")
    images = sample.images
    if images.ndim != 4 or images.shape[-1] != 4 or images.dtype != np.uint8 or images.shape[0] < 1:
        raise SampleError(f"sample {where}: images must be (N, H, W, 4) uint8 RGBA, got {images.shape} {images.dtype}")
    _check_cameras(where, images.shape[0], sample.cam2world, sample.intrinsics, sample.elevations, sample.azimuths)
    if sample.quality is not None and not math.isfinite(sample.quality):
        raise SampleError(f"sample {where}: quality is {sample.quality}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_error(where: str, name: str, expected: str, value: Any) -> SampleError:
    return SampleError(f"sample {where}: metadata field {name!r} must be {expected}, got {type(value).__name__} "
                       f"{reprlib.repr(value)}; write the sample again with the types of the schema "
                       "(vfusion3d_lightning/data/schema.py)")


def _metadata(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The sample's .json, its core fields' types checked: SampleError naming the field that is wrong."""
    if "json" not in raw:
        raise SampleError(f"sample {where}: missing its .json metadata (files present: {sorted(raw)})")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, TypeError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise SampleError(f"sample {where}: .json is not valid JSON ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict):
        raise SampleError(f"sample {where}: .json holds a {type(meta).__name__}, expected an object of the schema's "
                          "fields; write the sample again")
    if meta.get("schema") != SCHEMA_VERSION:
        raise SampleError(f"sample {where}: schema is {reprlib.repr(meta.get('schema'))}, expected "
                          f"{SCHEMA_VERSION!r}")
    missing = [name for name in ("object_id", "source", "num_views", "width", "height", "image_format")
               if name not in meta]
    if missing:
        raise SampleError(f"sample {where}: metadata lacks {missing}")
    if not isinstance(meta["object_id"], str) and not _is_int(meta["object_id"]):
        raise _field_error(where, "object_id", "a string", meta["object_id"])
    if not isinstance(meta["source"], str) or meta["source"] not in SOURCES:
        raise _field_error(where, "source", f"one of {SOURCES}", meta["source"])
    n = meta["num_views"]
    if not _is_int(n) or n < 1:
        raise _field_error(where, "num_views", "a positive integer", n)
    if not isinstance(meta["image_format"], str) or meta["image_format"] not in IMAGE_FORMATS:
        raise _field_error(where, "image_format", f"one of {IMAGE_FORMATS}", meta["image_format"])
    for name in ("width", "height"):
        if not _is_int(meta[name]) or meta[name] < 1:
            raise _field_error(where, name, "a positive integer", meta[name])
    if meta["width"] * meta["height"] > MAX_VIEW_PIXELS:
        raise SampleError(f"sample {where}: views of {meta['width']}x{meta['height']} pixels exceed the cap of "
                          f"{MAX_VIEW_PIXELS} pixels (schema.MAX_VIEW_PIXELS, 4096x4096); write the views smaller")
    if meta.get("prompt") is not None and not isinstance(meta["prompt"], str):
        raise _field_error(where, "prompt", "a string or null", meta["prompt"])
    quality = meta.get("quality")
    if quality is not None and (not isinstance(quality, (int, float)) or isinstance(quality, bool)
                                or not math.isfinite(quality)):
        raise _field_error(where, "quality", "a finite number or null", quality)
    return meta


@contextlib.contextmanager
def _as_sample_error(where: str) -> Iterator[None]:
    """Any other error while a sample's data is read becomes a SampleError naming it (so training can skip it)."""
    try:
        yield
    except (SampleError, MemoryError):
        raise
    except Exception as err:
        raise SampleError(f"sample {where}: cannot be decoded ({type(err).__name__}: {err}); write the sample "
                          "again or move its shard out of the folder") from err


def decode_sample(raw: dict[str, Any], require_cameras: bool = False,
                  select: Callable[[int], Sequence[int]] | None = None) -> MultiViewSample:
    """A webdataset sample dict (suffix -> bytes) -> validated MultiViewSample, or SampleError saying why not.

    `select(num_views)` -> view indices decodes only those views, in that order (per-view cameras and
    angles follow): training uses a few of an object's views, and image decoding is the cost. Every problem
    of the sample's data is a SampleError naming the sample (and its shard, from `__url__`), the field or view.
    """
    key = raw.get("__key__", "<unknown>")
    where = f"{key!r}" + (f" in {raw['__url__']}" if "__url__" in raw else "")
    with _as_sample_error(where):
        meta = _metadata(raw, where)
        n, fmt = meta["num_views"], meta["image_format"]
        files_per_view = 1 if fmt == "png" else 2
        if n * files_per_view > len(raw):  # before listing the names of a num_views of 10**9
            raise SampleError(f"sample {where}: num_views is {n}, but it holds only {len(raw)} files; write the "
                              "sample again")
        needed = [view_name(i, s) for i in range(n) for s in (("png",) if fmt == "png" else ("jpg", "mask.png"))]
        absent = [name for name in needed if name not in raw]
        if absent:
            raise SampleError(f"sample {where}: missing view files {absent[:6]}{' ...' if len(absent) > 6 else ''}")
        arrays = {name: _array(meta, name, shape, where) for name, shape in (
            ("cam2world", (n, 4, 4)), ("intrinsics", (n, 3, 3)), ("elevations", (n,)), ("azimuths", (n,)))}
        _check_cameras(where, n, **arrays)  # all views, before any decoding: errors give the sample's view numbers
    try:
        indices = list(range(n)) if select is None else [int(i) for i in select(n)]
    except ValueError as err:
        raise SampleError(f"sample {where}: {err}") from err
    if not indices or min(indices) < 0 or max(indices) >= n:
        raise SampleError(f"sample {where}: selected views {indices} are not within its {n} views")
    with _as_sample_error(where):
        size = (meta["width"], meta["height"])
        views = []
        for i in indices:
            if fmt == "png":
                view = _decode_view(raw[view_name(i, "png")], where, i, view_name(i, "png"), "RGBA", size)
            else:
                rgb = _decode_view(raw[view_name(i, "jpg")], where, i, view_name(i, "jpg"), "RGB", size)
                mask = _decode_view(raw[view_name(i, "mask.png")], where, i, view_name(i, "mask.png"), "L", size)
                view = np.concatenate([rgb, mask[..., None]], axis=-1)
            views.append(view)
        sample = MultiViewSample(
            key=key,
            object_id=str(meta["object_id"]),
            source=meta["source"],
            images=np.stack(views),
            **{name: _subset(array, indices) for name, array in arrays.items()},
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


def check_tar_end(path: str | Path) -> None:
    """Raise tarfile.ReadError unless the file ends as a whole tar does: with the end-of-archive marker (two zero
    blocks; writers pad to whole blocks). A file cut inside a member header otherwise reads as a shorter, valid
    archive (tarfile and webdataset stop there without a word), losing its last samples silently."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size >= 1024 and size % 512 == 0:
            handle.seek(size - 1024)
            if not handle.read(1024).strip(b"\0"):
                return
    raise tarfile.ReadError("it ends without the end-of-archive marker: the file was cut")


def read_raw_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """The samples of one shard file as stored (suffix -> bytes, and `__key__`), in order, undecoded.

    All of the file, in any process: `wds.WebDataset` would split its shard list over DataLoader workers and
    refuse to run under more than one rank, so a worker or rank reading a shard of its own got nothing or failed.
    """
    try:
        check_tar_end(path)
    except tarfile.TarError as err:
        raise unreadable_shard(path, err) from err
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


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` (1-based) of a job spread over machines: the samples whose key hashes to it, written
    to shards numbered index-1, index-1+count, index-1+2*count, ..., so that parts share one folder without
    clashing and any machine deals the same keys to the same part."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"part {self.index}/{self.count}: the part must be 1..{self.count}, as in --part 2/8")

    @classmethod
    def parse(cls, text: str) -> Part:
        index, slash, count = text.partition("/")
        if not (slash and index.strip().isdigit() and count.strip().isdigit()):
            raise ValueError(f"--part {text!r}: expected I/N, part I of N (1-based), e.g. --part 2/8")
        return cls(int(index), int(count))

    def owns_key(self, key: str) -> bool:
        """Dealt by a hash of the key alone: the same on every machine, and whatever else the folder holds."""
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % self.count == self.index - 1

    def owns_shard(self, index: int) -> bool:
        return index % self.count == self.index - 1

    @property
    def name(self) -> str:  # in the names of the part's own report, failure log and lock
        return f"part-{self.index}-of-{self.count}"


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the sample `key` falls in the held-out `fraction` of a train / held-out split: by a hash of the key
    alone (salted apart from `Part`'s), so an asset keeps its side however many assets are added and wherever it
    is rendered."""
    digest = hashlib.sha256(f"held-out:{key}".encode()).digest()[:8]
    return int.from_bytes(digest, "big") < fraction * 2**64


class ShardWriter(wds.ShardWriter):
    """webdataset's ShardWriter that writes `<prefix>-NNNNNN.tar` atomically.

    Each shard is written as `.tar.partial` and renamed when complete, so a killed job never leaves a
    truncated shard under a final name; an error while a sample is being written (a full disk) discards the
    unfinished shard, one between samples publishes it; numbering continues after the shards already in
    `directory`. With `part`, only that part's shard numbers are used (see `Part`). A shard is never written
    over: a name already taken (another run writing the same folder) stops the job with an error.
    """

    def __init__(self, directory: str | Path, prefix: str = "shard", maxcount: int = 1000, maxsize: float = 1e9,
                 image_format: str = "png", part: Part | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.image_format = image_format
        self.part = part
        start = 1 + max((shard_index(p) for p in complete_shards(self.directory, prefix)), default=-1)
        if part is not None:  # the part's next number after every shard there
            start += (part.index - 1 - start) % part.count
        super().__init__(str(self.directory / f"{prefix}-%06d.tar.partial"), maxcount=maxcount, maxsize=maxsize,
                         start_shard=start, verbose=0, post=self._publish,
                         mtime=0)  # no clock in the bytes: the same samples always give the same shard
        self.written: list[Path] = []

    def next_stream(self) -> None:
        super().next_stream()
        if self.part is not None:
            self.shard += self.part.count - 1  # the part's numbers only

    def _publish(self, partial: str) -> None:
        final = partial[: -len(".partial")]
        if os.path.exists(final):
            raise FileExistsError(f"{final} exists: another run is writing shards into {self.directory}; give each "
                                  "run a folder of its own, or the parts of one job --part I/N")
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


def write_shard(path: str | Path, samples: Sequence[dict[str, Any]], replace: bool = False) -> None:
    """Encoded samples (`encode_sample`, or webdataset dicts) -> one tar at `path`, written as `.tar.partial` and
    renamed when complete: an error (a full disk) leaves no cut shard. Without `replace`, a shard already at
    `path` (another run writing the same folder) is an error and stays as it was."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with wds.TarWriter(str(partial), mtime=0) as tar:  # no clock in the bytes: the same samples, the same shard
            for sample in samples:
                tar.write(sample)
        if not replace and path.exists():
            raise FileExistsError(f"{path} exists: another run is writing shards into {path.parent}; give each run "
                                  "a folder of its own")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


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
            check_tar_end(path)
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile():
                        seen.setdefault(os.path.basename(member.name).split(".", 1)[0], None)
        except tarfile.TarError as err:  # a cut shard under a final name would otherwise fail without its name
            raise unreadable_shard(path, err) from err
        keys[path] = list(seen)
    return keys


def resume_shard_folder(directory: str | Path, prefix: str = "shard", part: Part | None = None) -> set[str]:
    """Prepare `directory` for a resumable job: remove `.tar.partial` files a killed run left (their samples
    are made again; with `part`, only that part's, as the other parts may be writing theirs) and return the keys
    already in complete shards (skipped)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar.partial"):
        if part is None or part.owns_shard(shard_index(stale)):
            stale.unlink()
    return {key for keys in keys_in_shards(complete_shards(directory, prefix)).values() for key in keys}
