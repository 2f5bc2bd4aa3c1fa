"""`vfusion3d-lightning weights`: the known pretrained weights and whether they are present."""

from __future__ import annotations

from pathlib import Path

from vfusion3d_lightning import hub


def weights(checkpoint_dir: Path | None = None) -> dict[str, bool]:
    """List the weights catalogue: each entry's expected file, whether it is there, and where it comes from.

    Args:
        checkpoint_dir: folder that holds the weights (default: $VFUSION3D_CHECKPOINTS, else checkpoints/).
    """
    directory = hub.checkpoint_dir(checkpoint_dir)
    present = {}
    for name, entry in hub.load_registry().items():
        path = directory / entry.filename
        present[name] = path.exists()
        state = "present" if present[name] else "missing"
        print(f"{name:14s} {state:8s} {path}\n{'':14s} {entry.description}\n{'':14s} source: {entry.source}")
    return present
