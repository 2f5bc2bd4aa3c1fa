"""The registry of known pretrained weights (`checkpoints/registry.yaml`) and safe weight-file loading."""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file as load_safetensors

CHECKPOINT_DIR_ENV = "VFUSION3D_CHECKPOINTS"
CONVERTERS = ("vfusion3d_released", "dinov2_hf", "lrm", "timm")


@dataclass(frozen=True)
class WeightsEntry:
    name: str
    description: str
    source: str
    filename: str
    sha256: str | None
    converter: str
    config: str


def checkpoint_dir(override: str | Path | None = None) -> Path:
    """Where weights live: `override`, else $VFUSION3D_CHECKPOINTS, else the source tree's checkpoints/."""
    if override is not None:
        return Path(override)
    if os.environ.get(CHECKPOINT_DIR_ENV):
        return Path(os.environ[CHECKPOINT_DIR_ENV])
    return Path(__file__).resolve().parents[1] / "checkpoints"


def registry_path() -> Path:
    # the registry ships with the source tree, next to the weights it describes
    return Path(__file__).resolve().parents[1] / "checkpoints" / "registry.yaml"


def load_registry() -> dict[str, WeightsEntry]:
    path = registry_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights registry not found at {path}; install vfusion3d-lightning from its source tree "
            "(pip install -e .) so that checkpoints/registry.yaml is present"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    entries = {}
    for name, fields in raw.items():
        entry = WeightsEntry(name=name, **fields)
        if entry.converter not in CONVERTERS:
            raise ValueError(f"registry entry {name!r} names converter {entry.converter!r}; known: {CONVERTERS}")
        entries[name] = entry
    return entries


def sha256_of(path: Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_weights(name: str, directory: str | Path | None = None) -> tuple[WeightsEntry, Path]:
    """Registry entry and local file of `name`; a clear error if the file is absent or its digest is wrong."""
    registry = load_registry()
    if name not in registry:
        raise KeyError(f"no weights named {name!r} in {registry_path()}; known names: {sorted(registry)}")
    entry = registry[name]
    path = checkpoint_dir(directory) / entry.filename
    if not path.exists():
        raise FileNotFoundError(
            f"weights {name!r} ({entry.description}) are not at {path}. Download them from {entry.source} and "
            f"save the file as {path} (or set ${CHECKPOINT_DIR_ENV} to the folder that holds {entry.filename})."
        )
    if path.is_file():
        digest = sha256_of(path)
        if entry.sha256 is None:
            print(f"[vfusion3d-lightning] {path}: sha256 {digest} (not verified: the registry has no digest "
                  f"for {name!r})")
        elif digest != entry.sha256:
            raise ValueError(
                f"{path} has sha256 {digest} but the registry expects {entry.sha256} for {name!r}: the download "
                f"is incomplete or a different file; download it again from {entry.source}"
            )
    return entry, path


def locate_weights(source: str | os.PathLike, directory: str | Path | None = None,
                   missing: str = "no weights at {path}") -> tuple[WeightsEntry | None, Path]:
    """An existing path as it is (no entry), else the file of a registry name; `missing` (with {path}) is the
    error for a path that does not exist."""
    path = Path(source)
    if path.exists():
        return None, path
    if isinstance(source, str) and os.sep not in source and not path.suffix:
        return resolve_weights(source, directory)
    raise FileNotFoundError(missing.format(path=path))


def load_state_file(path: str | Path, mmap: bool = False) -> dict:
    """Read a weights file without executing code: safetensors, or torch.load(weights_only=True). `mmap`
    leaves a torch file's tensors on disk until used (a cheap look at a large checkpoint's other entries)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers, and unpickling "
            f"those would run code from the file. Re-save its tensors with safetensors. ({err})"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or another format): {err}") from err
