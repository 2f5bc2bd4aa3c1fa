"""LightningDataModules over multi-view WebDataset shards: LRM views and orbit-video clips.

Sharding across DDP ranks and DataLoader workers: the (shuffled) shard list is dealt round-robin to the
rank x worker slots, so within a pass no two slots read the same sample. Every rank yields the same number
of samples per epoch (`samples_per_epoch // world_size`, split over its workers); a slot that runs out of
shards starts its shards again, so no rank waits for another at the end of an epoch.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from vfusion3d_lightning.cameras import (
    canonical_source_pose,
    canonicalize_poses,
    render_camera_vector,
    source_camera_vector,
)
from vfusion3d_lightning.data.schema import (
    MultiViewSample,
    SampleError,
    ShardError,
    check_tar_end,
    decode_sample,
    has_estimated_masks,
    keys_in_shards,
)

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]

# webdataset reads a `pipe:CMD` shard by running CMD in a shell; shard specs come from configs, command lines and
# other people's data lists, so such URLs are refused unless the user sets this to 1 for specs of their own
ALLOW_PIPE_ENV = "VFUSION3D_ALLOW_PIPE"


class UnsafeShardURLError(ShardError):
    """A shard URL that webdataset would open by running a shell command (`pipe:`), not allowed by the user."""


def command_scheme(url: str) -> str | None:
    """The scheme of `url` when webdataset opens it by running a shell command of the URL's (`pipe:`, also after
    webdataset's GOPEN_REWRITE rules), else None. http(s), gs, ... run fixed downloaders (curl, gsutil) on the URL
    as one argument, not a command of the URL's, and are allowed."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module: `webdataset.gopen` is also its function
    for candidate in (url, gopen.rewrite_url(url)):
        scheme = urlparse(candidate).scheme
        if scheme == "pipe" or (scheme and gopen.gopen_schemes.get(scheme) is gopen.gopen_pipe):
            return scheme
    return None


def check_shard_urls(urls: list[str], spec: Any = None) -> None:
    """Refuse shard URLs that run shell commands (see `command_scheme`) unless VFUSION3D_ALLOW_PIPE=1.

    Args:
        urls: the expanded shard URLs.
        spec: what the user gave (for the message); default the URLs.
    """
    if os.environ.get(ALLOW_PIPE_ENV) == "1":
        return
    unsafe = [u for u in urls if command_scheme(os.fspath(u))]
    if unsafe:
        raise UnsafeShardURLError(
            f"shard spec {spec if spec is not None else urls!r} names {unsafe[0]!r}, a `pipe:` URL: reading it runs "
            f"a shell command, so it is refused. Give shard files, folders, globs or http(s) URLs; if you wrote "
            f"this command yourself and trust it, set the environment variable {ALLOW_PIPE_ENV}=1")


def _local(path: str | os.PathLike) -> str:
    """A local file's path that webdataset cannot mistake for a URL: a file named `pipe:cmd.tar` found in a
    folder or by a glob is read as that file, never run (its absolute path has no URL scheme)."""
    path = os.fspath(path)
    return os.path.abspath(path) if urlparse(path).scheme else path


def _is_local(url: str) -> bool:
    return "://" not in url and not command_scheme(url)


def folder_shards(directory: str | os.PathLike) -> list[Path]:
    """The complete shards of a folder: every `*.tar` file in it (not `.tar.partial`, not hidden), by name."""
    return sorted(p for p in Path(directory).glob("*.tar") if not p.name.startswith(".") and p.is_file())


def expand_shards(pattern: str | list[str]) -> list[str]:
    """Shard URLs from a folder (its `*.tar` files, sorted; `.tar.partial` files and hidden files are left out),
    a brace pattern (`shard-{000000..000009}.tar`), a glob, a list, or comma-separated. `pipe:` URLs, which run
    a shell command, are refused unless VFUSION3D_ALLOW_PIPE=1 (`check_shard_urls`), before anything is read."""
    patterns = pattern if isinstance(pattern, list) else [p for p in pattern.split(",") if p]
    urls: list[str] = []
    for item in patterns:
        item = os.fspath(item)
        if os.path.isdir(item):
            shards = folder_shards(item)
            if not shards:
                raise FileNotFoundError(f"no .tar shards in the folder {item} (.tar.partial files are shards still "
                                        "being written); give a folder of shard .tar files, a glob or a list")
            urls.extend(_local(shard) for shard in shards)
        elif any(c in item for c in "*?["):
            matched = sorted(glob.glob(item))
            if not matched:
                raise FileNotFoundError(f"no shards match {item!r}")
            urls.extend(_local(match) for match in matched)
        else:
            urls.extend(_local(u) if os.path.isfile(u) else u for u in wds.shardlists.expand_urls(item))
    check_shard_urls(urls, pattern)
    missing = [u for u in urls if _is_local(u) and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[:3]}")
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in local shards, read from tar headers only."""
    remote = [u for u in urls if not _is_local(u)]
    if remote:
        raise ValueError(f"cannot count samples in remote shards ({remote[0]}); set samples_per_epoch")
    return sum(len(keys) for keys in keys_in_shards([os.fspath(u) for u in urls]).values())


def distributed_rank_and_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """Decoded, validated, transformed samples of this rank's and worker's share of the shards."""

    def __init__(self, urls: list[str], transform: ViewTransform, *,
                 samples_per_rank: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 shuffle_buffer: int = 100, seed: int = 0, require_cameras: bool = False,
                 on_error: OnError = "skip"):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.urls, self.transform = list(urls), transform
        self.samples_per_rank, self.rank, self.world_size = samples_per_rank, rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.require_cameras, self.on_error = require_cameras, on_error
        self.epoch = 0
        check_shard_urls(self.urls)

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        slots = self.world_size * workers
        if len(self.urls) < slots:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {self.world_size} rank(s) x {workers} worker(s) without "
                "repeats: write smaller shards (a lower maxcount) or use fewer workers"
            )
        return self.rank * workers + worker, slots, self.samples_per_rank // workers + (
            worker < self.samples_per_rank % workers)

    def _raw_samples(self, urls: list[str], skipped: Skipped) -> Iterator[dict]:
        def handler(err: Exception) -> bool:
            if self.on_error == "raise":
                raise err
            skipped.add(f"unreadable shard data ({type(err).__name__}: {err.args[0] if err.args else err})")
            log.warning("skipping unreadable shard data: %s", err)
            return True

        check_shard_urls(urls)  # again here, in the worker that opens them: a stream built by hand is checked too
        for url in urls:
            if _is_local(url):
                try:
                    check_tar_end(_local(url))
                except tarfile.TarError as err:
                    handler(tarfile.ReadError(f"{url}: {err}"))
                    continue
            yield from wds.tarfile_samples(iter([{"url": url}]), handler=handler)

    def _decoded(self, urls: list[str], rng: np.random.Generator, skipped: Skipped) -> Iterator[dict]:
        for raw in self._raw_samples(urls, skipped):
            try:
                sample = decode_sample(raw, self.require_cameras, lambda n: self.transform.select(n, rng))
                yield self.transform(sample, rng)
            except SampleError as err:
                if self.on_error == "raise":
                    raise
                skipped.add(skip_reason(err, raw))
                log.warning("skipping sample: %s", err)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (DataLoader divides by the batch size)."""
        return self.samples_per_rank

    def _endless(self, urls: list[str], rng: np.random.Generator, skipped: Skipped) -> Iterator[dict]:
        while True:  # a slot with fewer samples than its quota reads its shards again
            produced = False
            items = self._decoded(urls, rng, skipped)
            if self.shuffle and self.shuffle_buffer > 1:
                items = shuffled(items, self.shuffle_buffer, rng)
            for item in items:
                produced = True
                yield item
            if not produced:
                raise self._nothing_usable(urls, skipped)

    def _nothing_usable(self, urls: list[str], skipped: Skipped) -> SampleError:
        """One line: which shards, how many samples were skipped and the most common reason, what to do."""
        shards = f"{len(urls)} shard(s) {', '.join(os.fspath(u) for u in urls[:3])}{' ...' if len(urls) > 3 else ''}"
        if not skipped.count:
            return SampleError(f"no usable sample: {shards} hold no samples; give shards with samples in them")
        reason, times = skipped.reasons.most_common(1)[0]
        message = (f"no usable sample: all {skipped.count} sample(s) of {shards} were skipped, {times} of them "
                   f"because {reason}")
        if self.require_cameras and "no cameras" in reason:
            message += (" (the LRM needs cam2world and intrinsics in every sample, and `cam2world: null` means "
                        "none: render 3D assets with cameras, or give generated videos cameras with "
                        "`vfusion3d-lightning label`; the video model trains without them)")
        else:
            message += " (the log lists every skipped sample)"
        return SampleError(" ".join(message.split()))

    def __iter__(self) -> Iterator[dict]:
        slot, slots, quota = self._slot()
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        order = list(self.urls)
        if self.shuffle:  # the same permutation on every rank: seeded by epoch, not by slot
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        skipped = Skipped()
        for _, item in zip(range(quota), self._endless(order[slot::slots], rng, skipped)):
            yield item
        if skipped.count:
            log.warning("rank %d slot %d skipped %d bad sample(s) this epoch", self.rank, slot, skipped.count)


class Skipped:
    """The samples a stream skipped: how many, and how often each reason came up."""

    def __init__(self):
        self.count, self.reasons = 0, Counter()

    def add(self, reason: str) -> None:
        self.count += 1
        self.reasons[reason] += 1


def skip_reason(err: Exception, raw: dict) -> str:
    """A SampleError's message without the sample's name (`sample 'key' in url: `), so that the same problem of
    many samples counts as one reason."""
    message = str(err)
    where = f"sample {raw.get('__key__', '<unknown>')!r}" + (f" in {raw['__url__']}" if "__url__" in raw else "")
    return message[len(where) + 2:] if message.startswith(where + ": ") else message


def shuffled(items: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle a stream through a buffer of `buffer_size` items; each item comes out once."""
    buffer: list[dict] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


class EpochShuffle(Sampler[int]):
    """A random order of `size` indices seeded by (seed, epoch): the same epoch gives the same order in a resumed
    run, which a sampler drawing from one generator across epochs cannot."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())

    def __len__(self) -> int:
        return self.size


def trainer_progress(module: L.LightningDataModule) -> Callable[[], tuple[int, int]]:
    """(epoch, training batches processed in it) of the module's trainer, for `EpochDataLoader`."""
    def progress() -> tuple[int, int]:
        trainer = module.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return progress


class EpochDataLoader(DataLoader):
    """A loader whose order is a function of the epoch (its ShardStream's or EpochShuffle's), and which resumes
    mid-epoch: its state in a checkpoint is (epoch, batches trained), and the first pass after loading it skips
    those batches (read and dropped, not trained on), so a killed and resumed run trains on exactly the batches of
    an uninterrupted one.

    Args:
        dataset: a ShardStream, or a map-style dataset with `sampler=EpochShuffle(...)`.
        progress: (epoch, training batches processed in it) now, usually `trainer_progress(datamodule)`.
    """

    def __init__(self, dataset: Any, progress: Callable[[], tuple[int, int]], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.progress = progress
        self._resume_at: tuple[int, int] | None = None

    def __iter__(self):
        epoch, skip = self.progress()[0], 0
        if self._resume_at is not None:
            # Lightning starts the first pass before it updates its epoch counter: the checkpoint says which pass
            epoch, skip = self._resume_at
            if skip >= len(self):  # saved after the epoch's last batch: the next pass is the next epoch
                epoch, skip = epoch + 1, 0
            self._resume_at = None
        if isinstance(self.dataset, ShardStream):
            self.dataset.epoch = epoch
        if isinstance(self.sampler, EpochShuffle):
            self.sampler.set_epoch(epoch)
        batches = super().__iter__()
        if skip:
            log.info("resuming epoch %d: skipping the %d batch(es) trained before the checkpoint", epoch, skip)
            for _ in range(skip):
                next(batches)
        return batches

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = (int(state["epoch"]), int(state["batches"]))


def restore_loader_states(trainer: Any) -> None:
    """Hand the checkpoint's loader states to the training loaders, and start their pass again, when Lightning did
    not: a module whose configure_optimizers reads `trainer.estimated_stepping_batches` (ours: for the LR
    schedule's length) makes Lightning build and start the training loader before it restores the checkpoint, and
    it then drops the loaders' states (Lightning issue #20550, open in 2.6). Call from `on_train_start`; without
    pending states it does nothing."""
    fit_loop = trainer.fit_loop
    states = getattr(fit_loop, "_combined_loader_states_to_load", None)
    if not states or fit_loop._combined_loader is None or fit_loop._data_fetcher is None:
        return
    fit_loop._combined_loader._load_state_dicts(states)
    fit_loop._combined_loader_states_to_load = []
    iter(fit_loop._data_fetcher)  # the pass it had started (and prefetched from) was the one before the restore


def rgba_to_tensors(view: np.ndarray, size: int, composite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 4) uint8 -> rgb (3, size, size) and alpha (1, size, size), floats in [0, 1].

    composite: rgb on white through the alpha (an exact alpha: 3D renders). False: rgb as stored, and the alpha
    resized apart from it, as an RGBA resize premultiplies by alpha and so loses the colour where alpha is 0 (an
    estimated mask must not change the colours: `has_estimated_masks`).
    """
    if not composite:
        return _resized(view[..., :3], "RGB", size), _resized(view[..., 3], "L", size)[None]
    image = Image.fromarray(view, "RGBA")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    rgba = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    alpha = rgba[3:]
    return rgba[:3] * alpha + (1 - alpha), alpha


def _resized(array: np.ndarray, mode: str, size: int) -> torch.Tensor:
    """(H, W, C) or (H, W) uint8 -> (C, size, size) or (size, size) floats in [0, 1], bicubic as rgba_to_tensors."""
    image = Image.fromarray(np.ascontiguousarray(array), mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(image).copy()).float() / 255
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor


def normalized_intrinsics(k: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Pixel intrinsics (..., 3, 3) -> normalised (..., 3, 3)."""
    scale = np.diag([1 / width, 1 / height, 1.0]).astype(np.float32)
    return torch.from_numpy(scale @ k.astype(np.float32))


def object_views(num_views: int, views_per_object: int | None) -> list[int]:
    """The views of an object with `num_views` that a run limited to `views_per_object` uses: evenly strided in
    stored order (`linspace(0, num_views, views_per_object)`, rounded down), so 16 of 32 are views 0, 2, 4, ..., 30.
    Of `random32` renders these are 16 of the random views; of `uniform32` renders (4 rings of 8) 4 views 90 degrees
    apart on every ring: either way they still surround the object. None: every view.

    Raises:
        ValueError: the object has fewer views than `views_per_object` (the sample is skipped, or raises, as the
            data module's `on_error` says).
    """
    if views_per_object is None:
        return list(range(num_views))
    if num_views < views_per_object:
        raise ValueError(f"has {num_views} views, fewer than views_per_object {views_per_object}; render more views "
                         "per object or lower views_per_object")
    return np.linspace(0, num_views, views_per_object, endpoint=False).astype(int).tolist()


class ViewTransform(ABC):
    """Turns a decoded sample into tensors; `select` first names the views worth decoding."""

    def select(self, num_views: int, rng: np.random.Generator) -> list[int]:
        return list(range(num_views))

    @abstractmethod
    def __call__(self, sample: MultiViewSample, rng: np.random.Generator) -> dict:
        """The selected views of `sample` (in `select`'s order) -> a dict of tensors and strings."""


class LRMViews(ViewTransform):
    """Per sample: one input view for the encoder and K supervision views with canonicalised cameras.

    Views with an exact alpha (3D renders) are composited on white; views whose alpha is an estimated mask
    (`has_estimated_masks`: labelled generated videos) keep their RGB as generated, on white already, in the input
    image and the targets, and the mask goes to `target_masks` only (the opacity loss), as in VFusion3D; with
    `composite_estimated_masks` they are composited through the estimate too. With `views_per_object`, an object's
    views are drawn from that fixed subset of its views only (`object_views`).
    """

    def __init__(self, num_supervision_views: int, include_input_view: bool, input_size: int, supervision_size: int,
                 composite_estimated_masks: bool = False, views_per_object: int | None = None):
        self.k, self.include_input = num_supervision_views, include_input_view
        self.input_size, self.supervision_size = input_size, supervision_size
        self.composite_estimated_masks = composite_estimated_masks
        needed = self.k if self.include_input else self.k + 1
        if views_per_object is not None and views_per_object < needed:
            raise ValueError(f"views_per_object {views_per_object} leaves too few views for one input and {self.k} "
                             f"supervision views ({needed} needed); raise it or lower num_supervision_views")
        self.views_per_object = views_per_object

    def select(self, num_views: int, rng: np.random.Generator) -> list[int]:
        """The input view first, then the supervision views that are not the input view, all drawn from
        `object_views(num_views, views_per_object)`."""
        needed = self.k if self.include_input else self.k + 1
        if num_views < needed:
            raise ValueError(f"has {num_views} views; {needed} are needed for one input and {self.k} supervision views")
        candidates = object_views(num_views, self.views_per_object)
        return [candidates[i] for i in rng.permutation(len(candidates))[:needed].tolist()]

    def __call__(self, sample: MultiViewSample, rng: np.random.Generator) -> dict:
        # views arrive as chosen by `select`: the input view is view 0
        source = 0
        supervision = list(range(self.k)) if self.include_input else list(range(1, self.k + 1))
        height, width = sample.images.shape[1:3]
        k_norm = normalized_intrinsics(sample.intrinsics, width, height)
        poses = canonicalize_poses(torch.from_numpy(sample.cam2world), source)
        composite = self.composite_estimated_masks or not has_estimated_masks(sample)
        image, _ = rgba_to_tensors(sample.images[source], self.input_size, composite)
        targets = [rgba_to_tensors(sample.images[i], self.supervision_size, composite) for i in supervision]
        return {
            "input_image": image,
            "source_camera": source_camera_vector(canonical_source_pose(), k_norm[source]),
            "target_images": torch.stack([rgb for rgb, _ in targets]),
            "target_masks": torch.stack([alpha for _, alpha in targets]),
            "render_cameras": render_camera_vector(poses[supervision], k_norm[supervision]),
            "object_id": sample.object_id,
        }


class OrbitClip(ViewTransform):
    """Per sample: `num_frames` views in orbit order (evenly strided when the orbit has more views)."""

    def __init__(self, num_frames: int, frame_size: int):
        self.num_frames, self.frame_size = num_frames, frame_size

    def select(self, num_views: int, rng: np.random.Generator) -> list[int]:
        if num_views < self.num_frames:
            raise ValueError(f"has {num_views} views; clips need {self.num_frames}")
        return np.linspace(0, num_views, self.num_frames, endpoint=False).astype(int).tolist()

    def __call__(self, sample: MultiViewSample, rng: np.random.Generator) -> dict:
        if sample.azimuths is not None and sample.num_views > 1:
            steps = np.remainder(np.diff(sample.azimuths), 2 * np.pi)
            if not np.allclose(steps, steps[0], atol=1e-3):
                raise SampleError(f"sample {sample.key!r} is not an evenly spaced orbit (azimuth steps {steps[:4]})")
        composite = not has_estimated_masks(sample)  # generated frames are on white already; a mask must not alter them
        rgb = torch.stack([rgba_to_tensors(view, self.frame_size, composite)[0] for view in sample.images])
        elevation = float(sample.elevations[0]) if sample.elevations is not None else float("nan")
        return {"frames": rgb, "prompt": sample.prompt or "", "elevation": elevation, "object_id": sample.object_id}


class _ShardDataModule(L.LightningDataModule):
    """Shared plumbing: shard patterns, rank-aware streams, loaders."""

    require_cameras = False

    def __init__(self, transform: ViewTransform, train_shards: str,
                 val_shards: str | None, batch_size: int, num_workers: int, samples_per_epoch: int | None,
                 val_samples: int | None, shuffle_buffer: int, seed: int, on_error: OnError,
                 val_transform: ViewTransform | None = None):
        super().__init__()
        self.transform = transform
        self.val_transform = val_transform or transform
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.samples_per_epoch, self.val_samples = samples_per_epoch, val_samples
        self.shuffle_buffer, self.seed, self.on_error = shuffle_buffer, seed, on_error

    def _rank_and_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return distributed_rank_and_size()

    def loader(self, pattern: str, samples: int | None, train: bool) -> EpochDataLoader:
        """A loader of this rank's share of `pattern`, with whole batches on every worker."""
        urls = expand_shards(pattern)
        rank, world = self._rank_and_size()
        total = samples if samples is not None else count_samples(urls)
        # fewer workers where the shards or samples cannot keep them all busy (a small validation set)
        workers = min(self.num_workers, len(urls) // world, total // world // self.batch_size)
        if workers < self.num_workers:
            log.info("%s loader: %d worker(s) instead of %d for %d shard(s) and %d sample(s) over %d rank(s)",
                     "train" if train else "val", workers, self.num_workers, len(urls), total, world)
        # whole batches per worker: then the DataLoader's length is exactly what every rank yields
        per_batch_round = self.batch_size * max(1, workers)
        per_rank = total // world // per_batch_round * per_batch_round
        if per_rank == 0:
            raise ValueError(f"{total} samples over {world} rank(s) cannot fill a batch of {self.batch_size}; "
                             "lower batch_size or add samples")
        transform = self.transform if train else self.val_transform
        dataset = ShardStream(urls, transform, samples_per_rank=per_rank, rank=rank, world_size=world,
                              shuffle=train, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                              require_cameras=self.require_cameras, on_error=self.on_error)
        # persistent workers would keep a stale epoch; drop_last keeps batch counts equal on every rank
        return EpochDataLoader(dataset, trainer_progress(self), batch_size=self.batch_size, num_workers=workers,
                               drop_last=True, pin_memory=torch.cuda.is_available(), persistent_workers=False)

    def train_dataloader(self) -> EpochDataLoader:
        return self.loader(self.train_shards, self.samples_per_epoch, train=True)

    def val_dataloader(self) -> EpochDataLoader | list:
        if not self.val_shards:
            return []
        return self.loader(self.val_shards, self.val_samples, train=False)


class MultiViewDataModule(_ShardDataModule):
    """Batches for the LRM from multi-view shards.

    Each batch: input_image (B, 3, input_size, input_size), source_camera (B, 16),
    target_images (B, K, 3, S, S) on white, target_masks (B, K, 1, S, S), render_cameras (B, K, 25) in the
    frame where the input camera is canonical, object_id (list). The model picks render resolution and
    patch crops itself from the full-size targets.

    Images are composited on white through their alpha only where it is exact (3D renders). A sample whose alpha
    is an estimated mask (`schema.has_estimated_masks`: metadata `mask_method`, as `vfusion3d-lightning label`
    writes, or source "synthetic") gives its frames as generated to `input_image` and `target_images`, and its
    mask to `target_masks` alone, which only the opacity loss reads (VFusion3D's use of saliency masks): a
    wrong mask then costs opacity, not colour.

    Args:
        composite_estimated_masks: composite generated videos' images on white through their estimated masks
            too (whitening object pixels a mask misses); default False, as the paper.
        views_per_object: train on this fixed subset of each object's views only (`object_views`: evenly strided,
            16 of 32 renders are views 0, 2, ..., 30), for the paper's comparison of fine-tuning on 16 and 32 views
            per object from one 32-view render; None (default) uses every view. Validation always uses every view,
            so runs that differ in it are validated alike.
    """

    require_cameras = True

    def __init__(self, train_shards: str, val_shards: str | None = None, batch_size: int = 4, num_workers: int = 2,
                 num_supervision_views: int = 4, include_input_view: bool = True, input_size: int = 512,
                 supervision_size: int = 384, samples_per_epoch: int | None = None, val_samples: int | None = None,
                 shuffle_buffer: int = 100, seed: int = 0, on_error: OnError = "skip",
                 composite_estimated_masks: bool = False, views_per_object: int | None = None):
        views = (num_supervision_views, include_input_view, input_size, supervision_size, composite_estimated_masks)
        super().__init__(LRMViews(*views, views_per_object=views_per_object),
                         train_shards, val_shards, batch_size, num_workers, samples_per_epoch, val_samples,
                         shuffle_buffer, seed, on_error, val_transform=LRMViews(*views))
        # in the checkpoint, for `export` to record the training data in the model card; not logged (the module has
        # hyper-parameters of the same names, `seed`, which Lightning refuses to merge)
        self.save_hyperparameters(logger=False)


class VideoDataModule(_ShardDataModule):
    """Ordered orbit clips for the video model: frames (B, F, 3, S, S) in [0, 1] on white, prompt (list),
    elevation (B,) radians (NaN where unknown), object_id (list). Renders are composited on white through their
    alpha; generated videos (estimated masks, `schema.has_estimated_masks`) give their frames as generated."""

    def __init__(self, train_shards: str, val_shards: str | None = None, batch_size: int = 1, num_workers: int = 2,
                 num_frames: int = 16, frame_size: int = 256, samples_per_epoch: int | None = None,
                 val_samples: int | None = None, shuffle_buffer: int = 20, seed: int = 0,
                 on_error: OnError = "skip"):
        super().__init__(OrbitClip(num_frames, frame_size), train_shards, val_shards, batch_size, num_workers,
                         samples_per_epoch, val_samples, shuffle_buffer, seed, on_error)
