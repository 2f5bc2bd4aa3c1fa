"""Render a folder of 3D assets into multi-view shards: parallel, resumable, reporting what failed."""

from __future__ import annotations

import multiprocessing
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vfusion3d_lightning.data.render import (
    AssetLoadError,
    CameraSet,
    MeshRenderer,
    orbit_cameras,
    random_cameras,
    render_asset,
    scale_intrinsics,
    uniform_cameras,
)
from vfusion3d_lightning.data.schema import (
    MultiViewSample,
    ShardJobReport,
    ShardWriter,
    encode_sample,
    resume_shard_folder,
)

ASSET_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
VIEW_SETS = ("orbit16", "random32", "uniform32")
REPORT_NAME = "render_report.json"


@dataclass
class RenderSettings:
    views: str = "orbit16"
    resolution: int = 256
    radius: float = 1.5
    seed: int = 0
    image_format: str = "png"
    backend: str | None = "egl"

    def __post_init__(self) -> None:
        if self.views not in VIEW_SETS:
            raise ValueError(f"views must be one of {VIEW_SETS}, got {self.views!r}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {self.resolution}")


def sample_key(path: Path) -> str:
    """A webdataset-safe key from a file name: no dots, nothing outside [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "asset"


def object_cameras(settings: RenderSettings, key: str) -> CameraSet:
    # seeded per object, so a resumed or re-ordered run gives each object the same cameras
    rng = np.random.default_rng([settings.seed, zlib.crc32(key.encode())])
    if settings.views == "orbit16":
        return orbit_cameras(rng, 16, settings.radius, resolution=settings.resolution)
    if settings.views == "random32":
        return random_cameras(rng, 32, settings.radius, resolution=settings.resolution)
    return uniform_cameras(32, settings.radius, resolution=settings.resolution)


_renderer: MeshRenderer | None = None


def _start_worker(settings: RenderSettings) -> None:
    global _renderer
    _renderer = MeshRenderer(settings.resolution, backend=settings.backend)


def _render_one(job: tuple[str, str, str, RenderSettings]) -> tuple[str, dict[str, Any] | None, str | None]:
    """(path, key, relative path, settings) -> (path, encoded sample, None) or (path, None, reason)."""
    path, key, relative, settings = job
    try:
        cameras = object_cameras(settings, key)
        images = render_asset(_renderer, path, cameras)
    except (AssetLoadError, ValueError, OSError) as err:
        return path, None, f"{type(err).__name__}: {err}"
    k = scale_intrinsics(cameras.intrinsics, settings.resolution).matrix().numpy()  # what render_asset used
    sample = MultiViewSample(
        key=key, object_id=key, source="3d", images=images, cam2world=cameras.poses,
        intrinsics=np.repeat(k[None], len(cameras), axis=0), elevations=cameras.elevations,
        azimuths=cameras.azimuths,
        extra={"asset": relative, "views": settings.views, "radius": settings.radius},
    )
    return path, encode_sample(sample, settings.image_format), None


def find_assets(asset_dir: Path) -> list[Path]:
    if not asset_dir.is_dir():
        raise FileNotFoundError(f"asset folder {asset_dir} does not exist")
    return sorted(p for p in asset_dir.rglob("*") if p.suffix.lower() in ASSET_SUFFIXES and p.is_file())


def render_folder(asset_dir: str | Path, out_dir: str | Path, settings: RenderSettings | None = None,
                  workers: int = 2, shard_size: int = 256, progress: bool = True) -> ShardJobReport:
    """Render every asset under `asset_dir` into `out_dir/shard-NNNNNN.tar`; objects already in complete
    shards are skipped, assets that fail are listed in the report and `render_report.json`.

    Rendering processes start with spawn, which imports the calling script again: in a script, call this
    under `if __name__ == "__main__":`. A rendering process that dies (a crash in the GL driver, the
    memory, or that missing guard) stops the job with an error; the complete shards stay, and a rerun
    resumes after them."""
    settings = settings or RenderSettings()
    asset_dir, out_dir = Path(asset_dir), Path(out_dir)
    done = resume_shard_folder(out_dir)
    assets = find_assets(asset_dir)
    keys = [sample_key(p) for p in assets]
    clashes = {k for k in keys if keys.count(k) > 1}
    if clashes:
        raise ValueError(f"asset files map to the same sample key {sorted(clashes)[:5]}; rename them")
    jobs = [(str(p), k, str(p.relative_to(asset_dir)), settings) for p, k in zip(assets, keys) if k not in done]
    report = ShardJobReport(skipped_existing=len(assets) - len(jobs))
    if jobs:
        context = multiprocessing.get_context("spawn")  # a fresh process per worker: GL contexts do not fork
        # an executor, not multiprocessing.Pool: Pool replaces a worker that dies and waits forever for its job
        with ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=_start_worker,
                                 initargs=(settings,)) as pool, \
                ShardWriter(out_dir, maxcount=shard_size, image_format=settings.image_format) as writer:
            pending = [pool.submit(_render_one, job) for job in jobs]
            try:
                # written in the assets' order, not as workers finish: the same folder gives the same shards,
                # which the seeded splits and pairings downstream depend on
                for finished in tqdm(pending, desc="render", unit="asset", disable=not progress):
                    path, encoded, reason = finished.result()
                    if encoded is None:
                        report.failed.append({"asset": path, "reason": reason})
                        tqdm.write(f"could not render {path}: {reason}")
                    else:
                        writer.write(encoded)
                        report.written += 1
            except BrokenProcessPool as err:
                raise RuntimeError(
                    f"a rendering process died, with {report.written} of {len(jobs)} assets rendered into "
                    f"{out_dir}: a crash in the GL driver, out of memory, or, in a script, render_folder called "
                    "without `if __name__ == \"__main__\":` (its processes start with spawn, which runs the "
                    "script again). Complete shards are kept: run again to resume after them") from err
            finally:  # after an error render no more: leaving the executor waits for every job still queued
                for job in pending:
                    job.cancel()
        report.shards = [str(p) for p in writer.written]
    report.save(out_dir / REPORT_NAME)
    return report

