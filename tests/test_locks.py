"""Two runs into one output folder: the second stops naming the first, and a killed run leaves no lock."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vfusion3d_lightning.io import LOCK_NAME, FolderInUseError, folder_lock

HOLD = """
import sys, time
from vfusion3d_lightning.io import folder_lock
with folder_lock(sys.argv[1], "render"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_held_folder_names_the_holder_and_a_killed_holder_frees_it(tmp_path):
    from vfusion3d_lightning.data.render_shards import render_folder

    out = tmp_path / "shards"
    holder = hold(out)
    try:
        with pytest.raises(FolderInUseError, match=rf"{out} is being written by another run \(render, process "
                                                   rf"{holder.pid} on .*\); wait for it"):
            with folder_lock(out, "generate"):
                pass
        (tmp_path / "assets").mkdir()
        with pytest.raises(FolderInUseError, match="being written by another run"):
            render_folder(tmp_path / "assets", out, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with folder_lock(out, "render") as folder:  # the operating system dropped the killed process's lock
        assert (folder / LOCK_NAME).is_file()
    assert not (out / LOCK_NAME).exists()  # a finished run leaves the folder as it found it


def test_the_lock_file_is_hidden_from_shard_listings(tmp_path):
    from vfusion3d_lightning.data.datamodules import expand_shards

    with folder_lock(tmp_path, "render"):
        (tmp_path / "shard-000000.tar").write_bytes(b"")
        assert [Path(p).name for p in expand_shards(str(tmp_path))] == ["shard-000000.tar"]


FORK_AND_HOLD = """
import os, sys, time
from vfusion3d_lightning.io import folder_lock
with folder_lock(sys.argv[1], "pipeline"):
    if os.fork() == 0:  # a forked worker (a DataLoader's, a render pool's) outlives its killed parent
        time.sleep(60)
        os._exit(0)
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_worker_forked_by_a_killed_run_does_not_keep_its_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", FORK_AND_HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with folder_lock(tmp_path, "pipeline"):  # the orphaned worker is still alive here
            pass
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_one_process_cannot_hold_a_folder_twice(tmp_path):
    with folder_lock(tmp_path, "render"):
        with pytest.raises(FolderInUseError, match="this process"):
            with folder_lock(tmp_path / ".." / tmp_path.name, "generate"):
                pass
