"""Assets that kill or hang their rendering process: the job goes on without them, records them, and a rerun
skips them; finished renders wait in memory for their turn only in a small window."""

import errno
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from vfusion3d_lightning.data import render_shards
from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render_shards import RenderSettings, find_assets, render_folder, sample_key
from vfusion3d_lightning.data.schema import complete_shards, keys_in_shards

SETTINGS = RenderSettings(resolution=16)
FAILURES_NAME = "render_failures.jsonl"

# run by every Python process started with this folder on PYTHONPATH, the spawned rendering processes included
SITECUSTOMIZE = """
import os

if os.environ.get("VF3D_TEST_FAULTS") == "1":
    import signal
    import time
    from pathlib import Path

    from vfusion3d_lightning.data import render_shards

    real_render_asset = render_shards.render_asset

    def render_asset(renderer, path, *args, **kwargs):
        if "crash" in Path(path).name:
            os.kill(os.getpid(), signal.SIGKILL)  # as a segfault in the GL driver or the OOM killer would
        if "hang" in Path(path).name:
            time.sleep(3600)
        return real_render_asset(renderer, path, *args, **kwargs)

    render_shards.render_asset = render_asset
"""


@pytest.fixture
def faults(tmp_path_factory, monkeypatch):
    """Rendering processes started from now on kill themselves on a "crash" asset and hang on a "hang" one."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    package_root = str(Path(render_shards.__file__).parents[2])
    path = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), package_root]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    monkeypatch.setenv("VF3D_TEST_FAULTS", "1")


def make_assets(folder: Path, count: int, faulty: dict[int, str] | None = None) -> list[Path]:
    paths = write_assets(folder, count, seed=3, formats=["ply"], progress=False)
    for index, fault in (faulty or {}).items():
        paths[index] = paths[index].rename(paths[index].with_name(f"{paths[index].stem}_{fault}.ply"))
    return paths


def shard_keys(folder: Path) -> list[str]:
    return [key for keys in keys_in_shards(complete_shards(folder)).values() for key in keys]


def failure_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / FAILURES_NAME).read_text().splitlines()]


def test_an_asset_that_kills_its_process_is_recorded_and_skipped_until_retried(tmp_path, faults, capsys):
    assets, out = tmp_path / "assets", tmp_path / "shards"
    paths = make_assets(assets, 6, {2: "crash"})
    crash = paths[2]
    good = [p for p in paths if p != crash]
    report = render_folder(assets, out, SETTINGS, workers=2, shard_size=2, progress=False)
    assert report.written == 5 and report.skipped_existing == 0
    assert [f["asset"] for f in report.failed] == [str(crash)]
    died = report.failed[0]["reason"]
    assert died == "its rendering process died (exit code -9, SIGKILL)"
    assert shard_keys(out) == [sample_key(p) for p in good]
    assert failure_log(out) == [{"key": sample_key(crash), "asset": crash.name, "reason": died}]
    assert json.loads((out / "render_report.json").read_text())["failed"] == report.failed

    # the same shards, byte for byte, as the same folder without it
    clean, clean_out = tmp_path / "clean", tmp_path / "clean_shards"
    shutil.copytree(assets, clean)
    (clean / crash.name).unlink()
    assert render_folder(clean, clean_out, SETTINGS, workers=2, shard_size=2, progress=False).written == 5
    ours, theirs = complete_shards(out), complete_shards(clean_out)
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == 3
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs))

    # a rerun does not render it again (it would crash again: a second line in the log), and says so
    capsys.readouterr()
    again = render_folder(assets, out, SETTINGS, workers=2, shard_size=2, progress=False)
    assert again.written == 0 and again.skipped_existing == 5
    assert again.failed == [{"asset": str(crash), "reason": f"skipped: {died} in an earlier run"}]
    said = capsys.readouterr()
    assert (f"skipped {crash.name}: {died} in an earlier run; pass retry_failed=True to try it again"
            in said.out + said.err)
    assert len(failure_log(out)) == 1

    # asked to, it tries it again: it crashes again, and is recorded again (once)
    retried = render_folder(assets, out, SETTINGS, workers=2, shard_size=2, progress=False, retry_failed=True)
    assert retried.written == 0 and retried.skipped_existing == 5
    assert retried.failed == [{"asset": str(crash), "reason": died}]
    assert failure_log(out) == [{"key": sample_key(crash), "asset": crash.name, "reason": died}]


def test_an_asset_that_hangs_is_timed_out_and_the_others_are_rendered(tmp_path, faults):
    assets, out = tmp_path / "assets", tmp_path / "shards"
    paths = make_assets(assets, 5, {1: "hang"})
    started = time.monotonic()
    report = render_folder(assets, out, SETTINGS, workers=2, shard_size=8, progress=False, timeout_s=5)
    assert time.monotonic() - started < 45
    assert report.written == 4
    assert report.failed == [{"asset": str(paths[1]), "reason": "took longer than 5 s (timeout_s)"}]
    assert shard_keys(out) == [sample_key(p) for p in paths if p != paths[1]]
    assert failure_log(out) == [{"key": sample_key(paths[1]), "asset": paths[1].name,
                                 "reason": "took longer than 5 s (timeout_s)"}]


def test_any_other_error_stops_the_job_at_once_without_waiting_for_renders(tmp_path, faults, monkeypatch):
    assets, out = tmp_path / "assets", tmp_path / "shards"
    make_assets(assets, 4, {1: "hang"})

    def full_disk(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(render_shards.ShardWriter, "write", full_disk)
    started = time.monotonic()
    with pytest.raises(OSError, match="No space left"):
        render_folder(assets, out, SETTINGS, workers=2, progress=False, timeout_s=None)
    assert time.monotonic() - started < 30  # the hanging render was not waited for
    deadline = time.monotonic() + 10  # killed processes may take a moment to be reaped on a loaded machine
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert multiprocessing.active_children() == [] and complete_shards(out) == []


def test_finished_renders_wait_for_their_turn_in_a_small_window(tmp_path, monkeypatch):
    # the writer takes samples in the assets' order; renders submitted or finished before their turn are held
    # in memory: without a window that is every asset of the folder
    assets, out = tmp_path / "assets", tmp_path / "shards"
    make_assets(assets, 20)
    count = {"submitted": 0, "written": 0, "most": 0}
    submit, write = render_shards.ProcessPoolExecutor.submit, render_shards.ShardWriter.write

    def counting_submit(self, fn, *args, **kwargs):
        if fn is render_shards._render_one:
            count["submitted"] += 1
            count["most"] = max(count["most"], count["submitted"] - count["written"])
        return submit(self, fn, *args, **kwargs)

    def counting_write(self, sample):
        count["written"] += 1
        return write(self, sample)

    monkeypatch.setattr(render_shards.ProcessPoolExecutor, "submit", counting_submit)
    monkeypatch.setattr(render_shards.ShardWriter, "write", counting_write)
    report = render_folder(assets, out, SETTINGS, workers=2, shard_size=8, progress=False)
    assert report.written == 20 and count["submitted"] == 20 and count["written"] == 20
    assert 1 <= count["most"] <= 4 * 2  # 4 per worker
    assert shard_keys(out) == [sample_key(p) for p in find_assets(assets)]


def test_a_cut_last_line_of_the_failure_log_is_tolerated_and_a_bad_line_before_it_is_not(tmp_path):
    assets, out = tmp_path / "assets", tmp_path / "shards"
    paths = make_assets(assets, 3)
    out.mkdir()
    log = out / FAILURES_NAME
    entry = {"key": sample_key(paths[0]), "asset": paths[0].name, "reason": "its rendering process died"}
    # a run killed while it appended the line of the second asset
    log.write_text(json.dumps(entry) + "\n" + json.dumps({"key": sample_key(paths[1]), "asset": "x"})[:20])
    report = render_folder(assets, out, SETTINGS, workers=1, progress=False)
    assert report.written == 2 and shard_keys(out) == [sample_key(p) for p in paths[1:]]
    assert report.failed == [{"asset": str(paths[0]),
                              "reason": "skipped: its rendering process died in an earlier run"}]
    assert log.read_text() == json.dumps(entry) + "\n"  # without the cut line: the next one starts a line

    log.write_text("{not json\n" + json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match=f"{FAILURES_NAME} line 1 is not JSON"):
        render_folder(assets, out, SETTINGS, workers=1, progress=False)
