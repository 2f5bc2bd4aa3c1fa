"""Hand labels of generated videos: a JSONL file, one {"key", "label" (1 good, 0 bad), ...} per line, appended
as labels are given (`vfusion3d-lightning label-ui`); when a key appears more than once, its last line wins."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vfusion3d_lightning.io import read_jsonl


def repair_jsonl_tail(path: str | os.PathLike) -> str | None:
    """End an append-only JSONL file on a whole line, after a kill mid-write: a partial last line is dropped
    (its record was never finished, so whoever wrote it writes it again), and a whole record missing only its
    newline gets one (so the next append does not run into it). Returns what was done, or None when the file
    is missing, empty or already ends on a newline. Shared by the logs that are appended line by line and
    fsync'd: the labels file (`vfusion3d-lightning label-ui`) and the prompt decisions log."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return None
    tail = data[data.rfind(b"\n") + 1:]
    try:
        json.loads(tail)
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for a cut multi-byte character
        with path.open("r+b") as handle:
            handle.truncate(len(data) - len(tail))
            handle.flush()
            os.fsync(handle.fileno())
        return f"{path}: dropped a cut last line ({len(tail)} bytes, left by an interrupted write)"
    with path.open("ab") as handle:
        handle.write(b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    return f"{path}: added the missing newline after its last line (left by an interrupted write)"


def read_labels(path: str | Path, missing_ok: bool = False) -> dict[str, int]:
    """key -> 1 (good) or 0 (bad); the last line per key wins, blank lines are skipped and a malformed line is
    an error naming its number. A missing file is {} with `missing_ok`, else an error saying how to make one."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return {}
        raise FileNotFoundError(f"labels file {path} does not exist; label videos with vfusion3d-lightning "
                                f"label-ui --shards SHARDS --labels {path}")
    labels: dict[str, int] = {}
    for number, entry in read_jsonl(path):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
            raise ValueError(f"{path}:{number}: expected an object with a non-empty string 'key'")
        label = entry.get("label")
        if isinstance(label, bool) or label not in (0, 1):  # bools are ints in Python; reject them too
            raise ValueError(f"{path}:{number}: label must be 1 (good) or 0 (bad), got {label!r}")
        labels[entry["key"]] = int(label)
    return labels
