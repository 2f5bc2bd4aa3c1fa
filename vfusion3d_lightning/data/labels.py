"""Hand labels of generated videos: a JSONL file, one {"key", "label" (1 good, 0 bad), ...} per line, appended
as labels are given (`vfusion3d-lightning label-ui`); when a key appears more than once, its last line wins."""

from __future__ import annotations

from pathlib import Path

from vfusion3d_lightning.io import read_jsonl


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
