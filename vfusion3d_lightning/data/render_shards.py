"""Render a folder of 3D assets into multi-view shards: parallel, resumable, reporting what failed."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vfusion3d_lightning.data.render import (
    UP_AXES,
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
    Part,
    ShardJobReport,
    ShardWriter,
    encode_sample,
    resume_shard_folder,
)
from vfusion3d_lightning.io import LOCK_NAME, atomic_write, folder_lock

ASSET_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
VIEW_SETS = ("orbit16", "random32", "uniform32")
ORBIT_STARTS = ("zero", "random")
REPORT_NAME = "render_report.json"
FAILURES_NAME = "render_failures.jsonl"
IN_FLIGHT_PER_WORKER = 4  # jobs submitted, or finished but not yet written, per worker: bounds what waits in memory
START_LIMIT_S = 300.0  # the least time new rendering processes get to start when timeout_s is set


@dataclass
class RenderSettings:
    views: str = "orbit16"
    resolution: int = 256
    radius: float = 1.5
    seed: int = 0
    image_format: str = "png"
    backend: str | None = "egl"
    up: str = "y"  # the asset files' up axis (see data/render.py)
    orbit_start: str = "zero"  # orbit16's first azimuth: the paper's 0, or random per object

    def __post_init__(self) -> None:
        if self.views not in VIEW_SETS:
            raise ValueError(f"views must be one of {VIEW_SETS}, got {self.views!r}")
        if self.up not in UP_AXES:
            raise ValueError(f"up must be one of {UP_AXES} (the asset files' up axis), got {self.up!r}")
        if self.orbit_start not in ORBIT_STARTS:
            raise ValueError(f"orbit_start must be one of {ORBIT_STARTS}, got {self.orbit_start!r}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8 pixels, got {self.resolution}")


def sample_key(path: Path) -> str:
    """A webdataset-safe key from a file name: no dots, nothing outside [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "asset"


def object_cameras(settings: RenderSettings, key: str) -> CameraSet:
    # seeded per object, so a resumed or re-ordered run gives each object the same cameras
    rng = np.random.default_rng([settings.seed, zlib.crc32(key.encode())])
    if settings.views == "orbit16":
        return orbit_cameras(rng, 16, settings.radius, resolution=settings.resolution,
                             random_start_azimuth=settings.orbit_start == "random")
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
        images = render_asset(_renderer, path, cameras, settings.up)
    except (AssetLoadError, ValueError, OSError) as err:
        return path, None, f"{type(err).__name__}: {err}"
    k = scale_intrinsics(cameras.intrinsics, settings.resolution).matrix().numpy()  # what render_asset used
    sample = MultiViewSample(
        key=key, object_id=key, source="3d", images=images, cam2world=cameras.poses,
        intrinsics=np.repeat(k[None], len(cameras), axis=0), elevations=cameras.elevations,
        azimuths=cameras.azimuths,
        extra={"asset": relative, "views": settings.views, "radius": settings.radius, "up": settings.up},
    )
    return path, encode_sample(sample, settings.image_format), None


def find_assets(asset_dir: Path) -> list[Path]:
    if not asset_dir.is_dir():
        raise FileNotFoundError(f"asset folder {asset_dir} does not exist")
    return sorted(p for p in asset_dir.rglob("*") if p.suffix.lower() in ASSET_SUFFIXES and p.is_file())


def render_folder(asset_dir: str | Path, out_dir: str | Path, settings: RenderSettings | None = None,
                  workers: int = 2, shard_size: int = 256, progress: bool = True, timeout_s: float | None = 600.0,
                  retry_failed: bool = False, part: Part | None = None,
                  keep: Callable[[str], bool] | None = None) -> ShardJobReport:
    """Render every asset under `asset_dir` into `out_dir/shard-NNNNNN.tar`; objects already in complete
    shards are skipped, assets that fail are listed in the report and `render_report.json`.

    With `keep`, only the assets whose sample key it accepts are rendered (one side of a train / held-out split).
    With `part` (I of N), only the assets whose key hashes to that part are rendered, into that part's shard
    numbers, with the part's own report, failure log and lock (`render_report.part-I-of-N.json`, ...): the N
    parts, on as many machines, may write one shared folder at once, and together give the samples of one
    run without parts.

    Rendering processes start with spawn, which imports the calling script again: in a script, call this
    under `if __name__ == "__main__":`. Processes that die before rendering anything (that missing guard, a
    GL context that cannot be made) stop the job with an error; the complete shards stay, and a rerun
    resumes after them. An asset that kills its rendering process (a crash in the GL driver, the out-of-memory
    killer) or takes longer than `timeout_s` costs only itself: the job goes on without it, and it is
    recorded in `out_dir/render_failures.jsonl`, which later runs read to skip it (it would stop them the
    same way) unless `retry_failed=True`. Assets that fail with an ordinary error (a file that cannot be
    read) are only listed in the report, and a rerun tries them again.

    Args:
        timeout_s: seconds one asset may take in its rendering process; one that takes longer is taken to
            hang and recorded as failed, and the rendering processes are restarted (the assets the others
            were rendering are rendered again). None: no limit.
        retry_failed: render the assets recorded in `render_failures.jsonl` again instead of skipping them.
        part: render only this part of the assets (see above).
        keep: render only the assets whose sample key this accepts (see above).
    """
    settings = settings or RenderSettings()
    asset_dir, out_dir = Path(asset_dir), Path(out_dir)
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds or None, got {timeout_s}")
    job, lock_name = ("render", LOCK_NAME) if part is None else (f"render {part.name}", f".{part.name}.lock")
    with folder_lock(out_dir, job, lock_name):
        return _render_folder(asset_dir, out_dir, settings, max(1, workers), shard_size, progress, timeout_s,
                              retry_failed, part, keep)


def part_file(name: str, part: Part | None) -> str:
    """`render_report.json` -> `render_report.part-2-of-8.json` for a part's own copy."""
    if part is None:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}.{part.name}{dot}{suffix}"


def _render_folder(asset_dir: Path, out_dir: Path, settings: RenderSettings, workers: int, shard_size: int,
                   progress: bool, timeout_s: float | None, retry_failed: bool,
                   part: Part | None, keep: Callable[[str], bool] | None) -> ShardJobReport:
    done = resume_shard_folder(out_dir, part=part)
    assets = find_assets(asset_dir)
    keys = [sample_key(p) for p in assets]
    clashes = {k for k in keys if keys.count(k) > 1}
    if clashes:
        raise ValueError(f"asset files map to the same sample key {sorted(clashes)[:5]}; rename them")
    chosen = [(p, k) for p, k in zip(assets, keys)
              if (keep is None or keep(k)) and (part is None or part.owns_key(k))]
    assets, keys = [p for p, _ in chosen], [k for _, k in chosen]
    failures = _FailureLog(out_dir / part_file(FAILURES_NAME, part))
    if retry_failed:
        failures.forget(set(keys))
    report = ShardJobReport(skipped_existing=sum(k in done for k in keys))
    jobs = []
    for path, key in zip(assets, keys):
        relative = str(path.relative_to(asset_dir))
        if key in done:
            continue
        if key in failures.entries:
            reason = failures.entries[key]["reason"]
            report.failed.append({"asset": str(path), "reason": f"skipped: {reason} in an earlier run"})
            tqdm.write(f"skipped {relative}: {reason} in an earlier run; pass retry_failed=True to try it again")
            continue
        jobs.append((str(path), key, relative, settings))
    if jobs:
        with ShardWriter(out_dir, maxcount=shard_size, image_format=settings.image_format, part=part) as writer:
            _render_jobs(jobs, out_dir, settings, min(workers, len(jobs)), timeout_s, writer, report, failures,
                         progress)
        report.shards = [str(p) for p in writer.written]
    report.save(out_dir / part_file(REPORT_NAME, part))
    return report


class _FailureLog:
    """`render_failures.jsonl`: the assets that killed or hung their rendering process, one JSON line each
    ({"key", "asset", "reason"}), appended as each is found; later runs skip them."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, str]] = {}
        if not path.exists():
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
        cut = False
        for position, (number, line) in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                if position == len(lines) - 1:  # a run killed while it appended this line: tried again
                    cut = True
                    break
                raise ValueError(f"{path} line {number} is not JSON ({err}): mend or delete that line") from err
            if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                    and isinstance(entry.get("reason"), str)):
                raise ValueError(f'{path} line {number}: expected an object with "key" and "reason", got '
                                 f"{line[:200]}")
            self.entries[entry["key"]] = entry
        if cut or not text.endswith("\n"):
            self._rewrite()  # so that the next line appended starts a line of its own

    def add(self, key: str, asset: str, reason: str) -> None:
        entry = {"key": key, "asset": asset, "reason": reason}
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")
            log.flush()
            os.fsync(log.fileno())  # a job killed right after (the same crash again, a reboot) keeps it
        self.entries[key] = entry

    def forget(self, keys: set[str]) -> None:
        if keys & self.entries.keys():
            self.entries = {k: e for k, e in self.entries.items() if k not in keys}
            self._rewrite()

    def _rewrite(self) -> None:
        if not self.entries:
            self.path.unlink(missing_ok=True)
            return
        text = "".join(json.dumps(entry) + "\n" for entry in self.entries.values())
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _probe() -> int:
    """The first job of every new pool: a pool that cannot run this died as it started, whatever the assets."""
    return os.getpid()


class _Pool:
    """A spawn ProcessPoolExecutor whose processes have all started (each has run a probe job)."""

    def __init__(self, workers: int, settings: RenderSettings, start_limit_s: float | None):
        context = multiprocessing.get_context("spawn")  # a fresh process per worker: GL contexts do not fork
        # an executor, not multiprocessing.Pool: Pool replaces a worker that dies and waits forever for its job
        self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                            initargs=(settings,))
        self.processes: dict[int, Any] = {}
        try:
            self._start(workers, start_limit_s)
        except BaseException:
            self.close(kill=True)
            raise

    def _start(self, workers: int, limit_s: float | None) -> None:
        # Every process must be up before the first asset: a job's clock (timeout_s) starts when it is
        # submitted, and a process that starts (imports, GL context) takes seconds. Processes start one per
        # submit, but the first one up may run every probe, so probe until each process has answered.
        started, pids = time.monotonic(), set()
        while len(pids) < workers:
            probes = [self.executor.submit(_probe) for _ in range(workers)]
            left = None if limit_s is None else max(0.0, started + limit_s - time.monotonic())
            finished, late = wait(probes, timeout=left)
            if late:
                raise TimeoutError(f"{limit_s:g} s")
            pids.update(probe.result() for probe in finished)  # BrokenProcessPool if one died
            if len(pids) < workers:
                time.sleep(0.05)
        self.processes = dict(self.executor._processes)  # to read their exit codes once the pool broke

    def submit(self, job: tuple[str, str, str, RenderSettings]) -> Future:
        return self.executor.submit(_render_one, job)

    def close(self, kill: bool = False) -> None:
        if kill:
            # ProcessPoolExecutor cannot stop a running job (Python 3.11 has no public API for it; 3.14 adds
            # kill_workers()): kill its processes, which breaks the pool, and shutdown then returns at once
            killed = list((self.executor._processes or {}).values())  # None once shut down
            for process in killed:
                process.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if kill:
            for process in killed:  # reaped here: the executor's own joining races with our kill
                process.join()

    def exit_code(self) -> int | None:
        """After a break and close(): the exit code of the one process that died by itself, if one did."""
        # the pool terminates (SIGTERM) its other processes when one dies
        codes = [p.exitcode for p in self.processes.values() if p.exitcode not in (None, -signal.SIGTERM)]
        return codes[0] if len(codes) == 1 else None


def _died(code: int | None) -> str:
    if code is None:
        return "its rendering process died"
    try:
        name = f", {signal.Signals(-code).name}" if code < 0 else ""
    except ValueError:  # not a known signal
        name = ""
    return f"its rendering process died (exit code {code}{name})"


def _start_error(err: BaseException, out_dir: Path, settings: RenderSettings, written: int, total: int) -> str:
    if isinstance(err, TimeoutError):
        what = f"the rendering processes did not start within {err}"
    else:
        what = "a rendering process died as it started"
    return (f"{what}, with {written} of {total} assets rendered into {out_dir}: the GL context could not be made "
            f"(backend {settings.backend!r}), out of memory, or, in a script, render_folder called without "
            "`if __name__ == \"__main__\":` (its processes start with spawn, which runs the script again). "
            "Complete shards are kept: run again to resume after them")


def _render_jobs(jobs: list[tuple[str, str, str, RenderSettings]], out_dir: Path, settings: RenderSettings,
                 workers: int, timeout_s: float | None, writer: ShardWriter, report: ShardJobReport,
                 failures: _FailureLog, progress: bool) -> None:
    # Samples are written in the assets' order, not as workers finish: the same folder gives the same
    # shards, which the seeded splits and pairings downstream depend on. Only jobs in [written, written +
    # window) are submitted, so at most `window` results wait in memory for the ones before them, and at
    # most `workers` at a time: each starts when it is submitted, and its clock for timeout_s with it.
    window = IN_FLIGHT_PER_WORKER * workers
    start_limit = None if timeout_s is None else max(timeout_s, START_LIMIT_S)
    waiting = deque(range(len(jobs)))  # not yet submitted, in order
    # jobs that were running when a pool broke, which kills them all: they run again one at a time, and
    # the one that breaks a pool alone is the asset that kills its process
    suspects: deque[int] = deque()
    results: dict[int, tuple[str, dict[str, Any] | None, str | None]] = {}
    running: dict[Future, tuple[int, float]] = {}
    pool: _Pool | None = None
    written = 0
    bar = tqdm(total=len(jobs), desc="render", unit="asset", disable=not progress)

    def fail(index: int, reason: str) -> None:  # a crash or a hang: recorded at once, so a killed job keeps it
        path, key, relative, _ = jobs[index]
        results[index] = path, None, reason
        failures.add(key, relative, reason)

    try:
        while True:
            while written in results:
                path, encoded, reason = results.pop(written)
                if encoded is None:
                    report.failed.append({"asset": path, "reason": reason})
                    tqdm.write(f"could not render {path}: {reason}")
                else:
                    writer.write(encoded)
                    report.written += 1
                written += 1
                bar.update()
            if written == len(jobs):
                return
            if pool is None:
                try:
                    pool = _Pool(workers, settings, start_limit)
                except (BrokenProcessPool, TimeoutError) as err:  # not an asset's fault: nothing is recorded
                    raise RuntimeError(_start_error(err, out_dir, settings, report.written, len(jobs))) from err
            try:
                if suspects:
                    if not running:
                        running[pool.submit(jobs[suspects[0]])] = suspects[0], time.monotonic()
                else:
                    while waiting and len(running) < workers and waiting[0] < written + window:
                        running[pool.submit(jobs[waiting[0]])] = waiting[0], time.monotonic()
                        waiting.popleft()
            except BrokenProcessPool:  # it broke between jobs: a process died, but not rendering an asset
                if not running:
                    pool.close()
                    pool = None
                    continue

            left = None
            if timeout_s is not None:
                left = max(0.0, min(start for _, start in running.values()) + timeout_s - time.monotonic())
            finished, _ = wait(running, timeout=left, return_when=FIRST_COMPLETED)
            crashed = []
            for future in finished:
                index, _ = running.pop(future)
                try:
                    results[index] = future.result()
                except BrokenProcessPool:
                    crashed.append(index)
            if crashed:
                # a process died and the pool fails every job still in it: which one killed it is unknown
                for future in wait(running).done:
                    index, _ = running.pop(future)
                    try:
                        results[index] = future.result()
                    except BrokenProcessPool:
                        crashed.append(index)
                pool.close()
                if len(crashed) == 1 and suspects and crashed[0] == suspects[0]:  # it ran alone, as a suspect
                    fail(crashed[0], _died(pool.exit_code()))
                else:  # even a job that ran alone runs again: an idle process may have been the one killed
                    suspects.extend(sorted(crashed))
                pool = None
            now = time.monotonic()
            overdue = [i for i, start in running.values() if timeout_s is not None and now - start >= timeout_s]
            if overdue:
                pool.close(kill=True)
                pool = None
                for index in sorted(overdue):
                    fail(index, f"took longer than {timeout_s:g} s (timeout_s)")
                # the others running are not to blame: first again, in a fresh pool
                waiting.extendleft(sorted((i for i, _ in running.values() if i not in overdue), reverse=True))
                running.clear()
            while suspects and suspects[0] in results:  # done, or found to be the culprit
                suspects.popleft()
    except BaseException:
        # render no more: leaving the executor would wait for every job still queued or running
        if pool is not None:
            pool.close(kill=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
        bar.close()
