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
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vfusion3d_lightning.cameras import (
    canonical_source_pose,
    canonicalize_poses,
    render_camera_vector,
    source_camera_vector,
)
from vfusion3d_lightning.data.schema import MultiViewSample, SampleError, complete_shards, decode_sample, keys_in_shards

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]


def expand_shards(pattern: str | list[str]) -> list[str]:
    """Shard URLs from a folder of shard-NNNNNN.tar files (its complete shards), a brace pattern
    (`shard-{000000..000009}.tar`), a glob, a list, or comma-separated."""
    patterns = pattern if isinstance(pattern, list) else [p for p in pattern.split(",") if p]
    urls: list[str] = []
    for item in patterns:
        item = os.fspath(item)
        if os.path.isdir(item):
            shards = complete_shards(item)
            if not shards:
                raise FileNotFoundError(f"no shard-NNNNNN.tar files in the folder {item}")
            urls.extend(os.fspath(shard) for shard in shards)
        elif any(c in item for c in "*?["):
            matched = sorted(glob.glob(item))
            if not matched:
                raise FileNotFoundError(f"no shards match {item!r}")
            urls.extend(matched)
        else:
            urls.extend(wds.shardlists.expand_urls(item))
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. {missing[:3]}")
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    return urls


def count_samples(urls: list[str]) -> int:
    """Samples in local shards, read from tar headers only."""
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
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

    def _raw_samples(self, urls: list[str], skipped: list[int]) -> Iterator[dict]:
        def handler(err: Exception) -> bool:
            if self.on_error == "raise":
                raise err
            skipped[0] += 1
            log.warning("skipping unreadable shard data: %s", err)
            return True

        yield from wds.tarfile_samples(iter([{"url": url} for url in urls]), handler=handler)

    def _decoded(self, urls: list[str], rng: np.random.Generator, skipped: list[int]) -> Iterator[dict]:
        for raw in self._raw_samples(urls, skipped):
            try:
                sample = decode_sample(raw, self.require_cameras, lambda n: self.transform.select(n, rng))
                yield self.transform(sample, rng)
            except SampleError as err:
                if self.on_error == "raise":
                    raise
                skipped[0] += 1
                log.warning("skipping sample: %s", err)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (DataLoader divides by the batch size)."""
        return self.samples_per_rank

    def _endless(self, urls: list[str], rng: np.random.Generator, skipped: list[int]) -> Iterator[dict]:
        while True:  # a slot with fewer samples than its quota reads its shards again
            produced = False
            items = self._decoded(urls, rng, skipped)
            if self.shuffle and self.shuffle_buffer > 1:
                items = shuffled(items, self.shuffle_buffer, rng)
            for item in items:
                produced = True
                yield item
            if not produced:
                raise RuntimeError(f"shards {urls[:3]} yielded no usable sample ({skipped[0]} skipped)")

    def __iter__(self) -> Iterator[dict]:
        slot, slots, quota = self._slot()
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        order = list(self.urls)
        if self.shuffle:  # the same permutation on every rank: seeded by epoch, not by slot
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        skipped = [0]
        for _, item in zip(range(quota), self._endless(order[slot::slots], rng, skipped)):
            yield item
        if skipped[0]:
            log.warning("rank %d slot %d skipped %d bad sample(s) this epoch", self.rank, slot, skipped[0])


def shuffled(items: Iterator[dict], buffer_size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle a stream through a buffer of `buffer_size` items; each item comes out once."""
    buffer: list[dict] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            yield buffer.pop(int(rng.integers(len(buffer))))
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


class EpochDataLoader(DataLoader):
    """Tells its ShardStream the epoch before each pass, so shuffling differs per epoch and resumes alike."""

    def __init__(self, dataset: ShardStream, epoch_source: Callable[[], int], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.epoch_source = epoch_source

    def __iter__(self):
        self.dataset.epoch = self.epoch_source()
        return super().__iter__()


def rgba_to_tensors(view: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 4) uint8 -> rgb on white (3, size, size) and alpha (1, size, size), floats in [0, 1]."""
    image = Image.fromarray(view, "RGBA")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    rgba = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    alpha = rgba[3:]
    return rgba[:3] * alpha + (1 - alpha), alpha


def normalized_intrinsics(k: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Pixel intrinsics (..., 3, 3) -> normalised (..., 3, 3)."""
    scale = np.diag([1 / width, 1 / height, 1.0]).astype(np.float32)
    return torch.from_numpy(scale @ k.astype(np.float32))


class ViewTransform(ABC):
    """Turns a decoded sample into tensors; `select` first names the views worth decoding."""

    def select(self, num_views: int, rng: np.random.Generator) -> list[int]:
        return list(range(num_views))

    @abstractmethod
    def __call__(self, sample: MultiViewSample, rng: np.random.Generator) -> dict:
        """The selected views of `sample` (in `select`'s order) -> a dict of tensors and strings."""


class LRMViews(ViewTransform):
    """Per sample: one input view for the encoder and K supervision views with canonicalised cameras."""

    def __init__(self, num_supervision_views: int, include_input_view: bool, input_size: int, supervision_size: int):
        self.k, self.include_input = num_supervision_views, include_input_view
        self.input_size, self.supervision_size = input_size, supervision_size

    def select(self, num_views: int, rng: np.random.Generator) -> list[int]:
        """The input view first, then the supervision views that are not the input view."""
        needed = self.k if self.include_input else self.k + 1
        if num_views < needed:
            raise ValueError(f"has {num_views} views; {needed} are needed for one input and {self.k} supervision views")
        return rng.permutation(num_views)[:needed].tolist()

    def __call__(self, sample: MultiViewSample, rng: np.random.Generator) -> dict:
        # views arrive as chosen by `select`: the input view is view 0
        source = 0
        supervision = list(range(self.k)) if self.include_input else list(range(1, self.k + 1))
        height, width = sample.images.shape[1:3]
        k_norm = normalized_intrinsics(sample.intrinsics, width, height)
        poses = canonicalize_poses(torch.from_numpy(sample.cam2world), source)
        image, _ = rgba_to_tensors(sample.images[source], self.input_size)
        targets = [rgba_to_tensors(sample.images[i], self.supervision_size) for i in supervision]
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
        rgb = torch.stack([rgba_to_tensors(view, self.frame_size)[0] for view in sample.images])
        elevation = float(sample.elevations[0]) if sample.elevations is not None else float("nan")
        return {"frames": rgb, "prompt": sample.prompt or "", "elevation": elevation, "object_id": sample.object_id}


class _ShardDataModule(L.LightningDataModule):
    """Shared plumbing: shard patterns, rank-aware streams, loaders."""

    require_cameras = False

    def __init__(self, transform: ViewTransform, train_shards: str,
                 val_shards: str | None, batch_size: int, num_workers: int, samples_per_epoch: int | None,
                 val_samples: int | None, shuffle_buffer: int, seed: int, on_error: OnError):
        super().__init__()
        self.transform = transform
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

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

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
        dataset = ShardStream(urls, self.transform, samples_per_rank=per_rank, rank=rank, world_size=world,
                              shuffle=train, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
                              require_cameras=self.require_cameras, on_error=self.on_error)
        # persistent workers would keep a stale epoch; drop_last keeps batch counts equal on every rank
        return EpochDataLoader(dataset, self._epoch, batch_size=self.batch_size, num_workers=workers,
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
    """

    require_cameras = True

    def __init__(self, train_shards: str, val_shards: str | None = None, batch_size: int = 4, num_workers: int = 2,
                 num_supervision_views: int = 4, include_input_view: bool = True, input_size: int = 512,
                 supervision_size: int = 384, samples_per_epoch: int | None = None, val_samples: int | None = None,
                 shuffle_buffer: int = 100, seed: int = 0, on_error: OnError = "skip"):
        super().__init__(LRMViews(num_supervision_views, include_input_view, input_size, supervision_size),
                         train_shards, val_shards, batch_size, num_workers, samples_per_epoch, val_samples,
                         shuffle_buffer, seed, on_error)


class VideoDataModule(_ShardDataModule):
    """Ordered orbit clips for the video model: frames (B, F, 3, S, S) in [0, 1] on white, prompt (list),
    elevation (B,) radians (NaN where unknown), object_id (list)."""

    def __init__(self, train_shards: str, val_shards: str | None = None, batch_size: int = 1, num_workers: int = 2,
                 num_frames: int = 16, frame_size: int = 256, samples_per_epoch: int | None = None,
                 val_samples: int | None = None, shuffle_buffer: int = 20, seed: int = 0,
                 on_error: OnError = "skip"):
        super().__init__(OrbitClip(num_frames, frame_size), train_shards, val_shards, batch_size, num_workers,
                         samples_per_epoch, val_samples, shuffle_buffer, seed, on_error)
