"""Reading and writing files: outputs never half-written under their final name, JSONL records, images as uint8."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


PARTIAL = ".partial"  # in the name of every file and folder still being written (atomic_write, ShardWriter)


def remove_partials(folder: str | os.PathLike) -> int:
    """Delete what killed runs left half-written under `folder` (names holding `PARTIAL`: `.x.partial-*` temporaries,
    `.partial-*` folders, `*.tar.partial` shards); call it only while holding the folder (`folder_lock`), when no
    live run can be writing them. Returns how many were removed."""
    stale = [p for p in Path(folder).rglob(f"*{PARTIAL}*")
             if p.name.endswith(PARTIAL) or p.name.startswith(".") and f"{PARTIAL}-" in p.name]
    removed = 0
    for path in sorted(stale, key=lambda p: len(p.parts)):
        if not path.exists() and not path.is_symlink():  # inside a folder removed before it
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed += 1
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`.

    The temporary name keeps `path`'s suffix, for writers that pick a format by it. A crash leaves the
    old file (if any) in place; parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{PARTIAL}-", suffix=path.suffix)
    os.close(handle)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; outputs get the permissions open() would give
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_folder(directory: str | os.PathLike, write: Callable[[Path], None],
                        last: Sequence[str] = ()) -> Path:
    """Fill a temporary folder with `write(tmp)`, then move each file it wrote to the same place under
    `directory`, replacing the file there; the files named in `last` move at the end.

    Every byte is written before any file is replaced, so a full disk or an error in `write` leaves the files
    of `directory` as they were (a crash while moving, a few renames, could mix old and new files). Files of
    `directory` that `write` does not write are kept. Returns `directory`.

    Args:
        directory: the folder to write into; created if absent.
        write: writes the new files into the temporary folder it is given (subfolders allowed).
        last: paths relative to the folder (e.g. the weights, by which loaders recognise a folder) moved after
            the others.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # inside `directory`: the same file system, so each move is a rename
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f"{PARTIAL}-"))
    try:
        write(tmp)
        files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
        order = [p for p in files if p.as_posix() not in last] + [p for p in files if p.as_posix() in last]
        for relative in order:
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp / relative, 0o666 & ~_UMASK)  # as open() would make it, whatever the writer did
            os.replace(tmp / relative, directory / relative)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Images (..., 3, H, W) in [0, 1] -> (..., H, W, 3) uint8, rounded."""
    pixels = images.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy()
    return (pixels * 255).round().astype(np.uint8)


def on_white(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 4) uint8 RGBA -> (N, 3, H, W) floats in [0, 1], composited on white."""
    rgba = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])


def require_extra(module: str, extra: str, purpose: str, advice: str = "") -> ModuleType:
    """Import `module`, a package of the optional extra `extra`; when it is missing, a ModuleNotFoundError in
    one line naming the pip line that installs it (then `advice`, another way round)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(f"{purpose} needs {module}, which is not installed: "
                                  f"pip install 'vfusion3d-lightning[{extra}]'" + (f"; {advice}" if advice else "")
                                  ) from None


def run_log_dir(trainer) -> Path:
    """A Lightning run's log folder, as Trainer.log_dir gives it but without its broadcast: every rank must
    join that broadcast, so rank-zero-only code that asks Trainer.log_dir hangs a multi-process run."""
    logger = trainer.logger
    directory = None
    if logger is not None:
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
    return Path(directory or trainer.default_root_dir)


def read_jsonl(path: str | os.PathLike, advice: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file, in order; a line that is not JSON is
    a ValueError naming `path:line` (then `advice`, e.g. what to do about it). A byte-order mark is skipped.

    Args:
        path: the JSONL file.
        advice: appended to the error for a bad line.
    """
    with open(path, encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})" + (f"; {advice}" if advice else "")) from None


LOCK_NAME = ".vfusion3d.lock"


class FolderInUseError(RuntimeError):
    """Another live run is writing the output folder."""


_HELD_HERE: set[Path] = set()  # POSIX locks never conflict within one process: this set does


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, job: str, lock_name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold `folder` for one writing run: a second run into it (a `.partial` of the first would be deleted,
    shard numbers would restart) stops with an error naming the process that holds it. The lock is the
    operating system's (a POSIX record lock on `folder/.vfusion3d.lock`, removed at the end): a killed run
    leaves no lock behind, and unlike flock it is not inherited by forked workers, which can outlive a killed
    parent by seconds.

    Args:
        folder: the output folder (created if missing).
        job: what holds it, for the other run's error (e.g. "render").
        lock_name: the lock file's name: runs that may share the folder (the parts of one job) hold one each.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name
    key = folder.resolve() / lock_name
    if key in _HELD_HERE:
        raise FolderInUseError(f"{folder} is being written by another run (this process, {os.getpid()}); "
                               "write to another folder")
    while True:
        handle = open(path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderInUseError(f"{folder} is being written by another run ({holder}); wait for it to finish, "
                                   "or write to another folder") from None
        try:  # the holder before us removes the file as it lets go: lock the file that is there now
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    _HELD_HERE.add(key)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{job}, process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield folder
    finally:
        path.unlink(missing_ok=True)  # while still held, so no run can lock the file being removed
        _HELD_HERE.discard(key)
        handle.close()  # closing drops the POSIX lock
