"""Where weights come from and how every model reads them.

- the registry of known pretrained weights (`checkpoints/registry.yaml`, shipped inside the package:
  `presets.registry_path()`) and `checkpoint_dir()`, the folder its files are looked up in;
- `locate_weights`: a path as given, or a registry name -> its file, sha256-checked;
- `missing_weights_error`: the one error for weights that are not there (what, where from, where to put it);
- `load_state_file`: tensors from a file without running code from it;
- `read_lightning_checkpoint`: a LightningModule's `.ckpt` -> its hyper-parameters and its network's weights,
  which every model's `from_pretrained` builds itself from;
- `load_state_into`: strict loading whose error names every missing, extra and mis-shaped key;
- `model_card`: the README.md of a `save_pretrained` folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pickle
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file as load_safetensors

from vfusion3d_lightning import presets

CHECKPOINT_DIR_ENV = "VFUSION3D_CHECKPOINTS"
LIGHTNING_SUFFIX = ".ckpt"
# converter (how a registry file becomes parameters) -> what loads it
CONVERTERS = {
    "vfusion3d_released": "LRM.from_pretrained",  # a torch checkpoint whose `model_state_dict` has released names
    "lrm": "LRM.from_pretrained",  # a save_pretrained folder or weights file of ours
    "dinov2_hf": "LRM.load_encoder_weights (encoder weights only)",  # transformers Dinov2Model weights
    "timm": "DinoFeatures(weights=...) (curation features)",  # timm weights as they are
    "diffusers": "VideoDiffusionModel.from_pretrained",  # a diffusers pipeline folder
    "quality_svm": "QualitySVM.from_pretrained",
    "elevation_mlp": "ElevationMLP.from_pretrained",
}


@dataclass(frozen=True)
class WeightsEntry:
    """One entry of the registry (see the comments at the top of `checkpoints/registry.yaml`)."""

    name: str
    description: str
    source: str
    filename: str
    sha256: str | None
    converter: str
    config: str | None = None


# ---------------------------------------------------------------- where weights are


def checkpoint_dir(override: str | os.PathLike | None = None) -> Path:
    """The folder that registry names resolve in: `<folder>/<entry filename>`.

    In order: `override`; else $VFUSION3D_CHECKPOINTS; else, running from a source checkout (or an editable
    install of one), the repository's `checkpoints/`, beside the registry; else (a wheel install, which has
    no repository) the user cache, `$XDG_CACHE_HOME/vfusion3d_lightning/checkpoints`, by default
    `~/.cache/vfusion3d_lightning/checkpoints`. Never the current directory: the same command would then
    find its weights or not depending on where it runs.

    Args:
        override: a folder that takes precedence over all of the above (e.g. `weights --checkpoint_dir`).
    """
    if override is not None:
        return Path(override)
    if os.environ.get(CHECKPOINT_DIR_ENV):
        return Path(os.environ[CHECKPOINT_DIR_ENV])
    tree = presets.source_tree()
    if tree is not None:
        return tree / "checkpoints"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "vfusion3d_lightning" / "checkpoints"


def registry_path() -> Path:
    """The registry file this install ships (`checkpoints/registry.yaml` of the repository)."""
    return presets.registry_path()


def load_registry() -> dict[str, WeightsEntry]:
    """Every registry entry by name."""
    path = registry_path()
    if not path.is_file():
        raise FileNotFoundError(f"this install of vfusion3d-lightning has no weights registry at {path}; reinstall "
                                "it (`pip install -e .` in a source checkout)")
    raw = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(WeightsEntry)} - {"name"}
    entries = {}
    for name, values in raw.items():
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"registry entry {name!r} in {path} has unknown fields {unknown}; known: "
                             f"{sorted(known)}")
        entry = WeightsEntry(name=name, **values)
        if entry.converter not in CONVERTERS:
            raise ValueError(f"registry entry {name!r} names converter {entry.converter!r}; known: "
                             f"{sorted(CONVERTERS)}")
        entries[name] = entry
    return entries


def sha256_of(path: Path, block: int = 1 << 24) -> str:
    """The sha256 hex digest of a file.

    Args:
        path: the file.
        block: bytes read at a time.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def missing_weights_error(what: str, fetch: str, save_as: str | os.PathLike,
                          note: str | None = None) -> FileNotFoundError:
    """The error for weights that are not where they are needed: one line naming what is missing, what to fetch
    and where to save it. Every loader raises this one, so the advice reads the same everywhere.

    Args:
        what: what is missing, e.g. "weights 'vfusion3d' (Released VFusion3D LRM ...)".
        fetch: where to get it: the registry entry's source, a URL, or a command such as `hf download ...`.
        save_as: the file or folder to save it as.
        note: a last clause: another way out (an environment variable, an option that needs no weights).
    """
    message = f"{what} not found: {_fetch_and_save(fetch, save_as)}" + (f"; {note}" if note else "")
    return FileNotFoundError(" ".join(message.split()))  # one line, whatever the parts held


def _fetch_and_save(fetch: str, save_as: str | os.PathLike) -> str:
    return f"fetch {fetch} and save it as {save_as}"


def resolve_weights(name: str, directory: str | os.PathLike | None = None) -> tuple[WeightsEntry, Path]:
    """A registry entry and its local file; an error that says what to fetch if the file is absent, and a
    refusal if its sha256 is not the registry's (printed instead where the registry has none yet).

    Args:
        name: the registry name.
        directory: the checkpoint folder (default: `checkpoint_dir()`).
    """
    registry = load_registry()
    if name not in registry:
        raise KeyError(f"no weights named {name!r} in {registry_path()}; known names: {sorted(registry)}")
    entry = registry[name]
    path = checkpoint_dir(directory) / entry.filename
    if not path.exists():
        raise missing_weights_error(f"weights {name!r} ({entry.description})", entry.source, path,
                                    f"or set ${CHECKPOINT_DIR_ENV} to the folder that holds {entry.filename}")
    if path.is_file():
        digest = sha256_of(path)
        if entry.sha256 is None:
            print(f"[vfusion3d-lightning] {path}: sha256 {digest} (not verified: the registry has no digest "
                  f"for {name!r})")
        elif digest != entry.sha256:
            raise ValueError(f"{path} has sha256 {digest} but the registry expects {entry.sha256} for {name!r}: a "
                             f"cut download or another file; {_fetch_and_save(entry.source, path)} again")
    return entry, path


def is_registry_name(source: str | os.PathLike) -> bool:
    """Whether `source` reads as a registry name rather than a path: a plain word, no folder, no suffix.

    Args:
        source: what a caller was given.
    """
    return isinstance(source, str) and os.sep not in source and "/" not in source and not Path(source).suffix


def locate_weights(source: str | os.PathLike, directory: str | os.PathLike | None = None, *,
                   what: str = "weights", expected: str | None = None, fetch: str | None = None,
                   converters: Iterable[str] | None = None) -> tuple[WeightsEntry | None, Path]:
    """An existing path as it is (no entry), else the registry entry and file of a name.

    Args:
        source: a file or folder, or a registry name.
        directory: the checkpoint folder registry names resolve in (default: `checkpoint_dir()`).
        what: what the weights are, for messages ("LRM weights").
        expected: what `source` may be, for the error of a path that does not exist.
        fetch: where the weights come from; given, a path that does not exist is `missing_weights_error`
            (fetch them, save them there) rather than a mistyped path.
        converters: the registry converters the caller reads; an entry of another is refused, naming what
            loads it.
    """
    path = Path(source).expanduser()
    if path.exists():
        return None, path
    if is_registry_name(source):
        entry, path = resolve_weights(str(source), directory)
        if converters is not None and entry.converter not in set(converters):
            raise ValueError(f"registry entry {entry.name!r} ({entry.description}) is not {what}: it loads with "
                             f"{CONVERTERS[entry.converter]}")
        return entry, path
    if fetch is not None:
        raise missing_weights_error(f"{what} at {path}", fetch, path)
    raise FileNotFoundError(f"no {what} at {path}" + (f": give {expected}" if expected else ""))


# ---------------------------------------------------------------- reading weights


def load_state_file(path: str | os.PathLike, mmap: bool = False) -> dict:
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
    except RuntimeError as err:
        if not (mmap and "_use_new_zipfile_serialization" in str(err)):
            raise ValueError(f"{path} is not a readable torch checkpoint (truncated or another format): "
                             f"{err}") from err
        return load_state_file(path)  # a legacy (non-zip) torch file cannot be memory-mapped: read it whole
    except pickle.UnpicklingError as err:
        raise unsafe_pickle_error(path, err) from None
    except EOFError as err:
        raise ValueError(f"{path} is not a readable torch checkpoint (truncated or another format): {err}") from err


def unsafe_pickle_error(path: str | os.PathLike, err: BaseException) -> ValueError:
    """The refusal of a torch file that only unpickling could read. Torch's own message ends by advising
    `weights_only=False`, which would run code from the file: only the object it stopped at is kept.

    Args:
        path: the file.
        err: torch's UnpicklingError.
    """
    found = re.search(r"Unsupported (?:global|operand)[^\n.]*", str(err))
    reason = f" ({found.group(0).strip()})" if found else ""
    return ValueError(f"refusing to load {path}: it holds objects other than tensors and plain containers{reason}, "
                      "and unpickling those would run code from the file. Use a checkpoint written by this package, "
                      "or re-save its tensors with safetensors")


def is_lightning_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` names a Lightning checkpoint (by its `.ckpt` suffix, as Lightning writes them).

    Args:
        path: a file path.
    """
    return Path(path).suffix == LIGHTNING_SUFFIX


@dataclass
class LightningCheckpoint:
    """What a model needs from a LightningModule's checkpoint."""

    path: Path
    hparams: dict[str, Any]  # the module's hyper-parameters (save_hyperparameters)
    state: dict[str, torch.Tensor]  # the network's weights, without the module's attribute prefix
    raw: dict[str, Any]  # the whole checkpoint: entries the module's hooks added (EMA, the SVM's bytes)


def read_lightning_checkpoint(path: str | os.PathLike, module: str, hparams: Iterable[str],
                              prefix: str | None = "model.", fit_config: str | None = None) -> LightningCheckpoint:
    """A LightningModule's checkpoint, read without running code from it (torch.load(weights_only=True), tensors
    left on disk until used) and told apart from other modules' by the hyper-parameters it must hold.

    Args:
        path: the `.ckpt` file.
        module: the LightningModule's class name, for messages ("LRMModule").
        hparams: hyper-parameter names every checkpoint of `module` holds.
        prefix: the network's attribute in the module, with a dot ("model."): its weights are returned without
            it and must be there; None for a module whose network is not in its state dict (QualityModule).
        fit_config: the shipped config that trains `module` ("configs/lrm/tiny.yaml"), for the message of a
            wrong file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = load_state_file(path, mmap=True)
    found = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    found = found if isinstance(found, dict) else {}
    how = f"one that `vfusion3d-lightning fit --config {fit_config or 'CONFIG'}` wrote, or a save_pretrained folder"
    if not set(hparams) <= set(found):
        raise ValueError(f"{path} is not a checkpoint of {module} (its hyper-parameters are {sorted(found)[:8]}); "
                         f"give {how}")
    state = {}
    if prefix is not None:
        state = {k[len(prefix):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{path} holds no `{prefix}` weights: not a checkpoint of {module}; give {how}")
    return LightningCheckpoint(path, dict(found), state, checkpoint)


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike,
                    hint: str | None = None, allow_missing: bool = False) -> None:
    """Load `state` into `module`: every key present (unless `allow_missing`), none extra, every shape equal;
    otherwise one error naming them all.

    Args:
        module: the network to load into.
        state: its weights, by its own parameter names.
        source: where they came from, for the error.
        hint: the error's last line: what to check (e.g. which config the weights need).
        allow_missing: keep the module's own value where `state` has none (weights a checkpoint leaves to a
            pretrained base).
    """
    expected = module.state_dict()
    missing = [] if allow_missing else sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"weights from {source} do not fit this model:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}")
        if hint:
            lines.append(f"  {hint}")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=not allow_missing)


# ---------------------------------------------------------------- save_pretrained folders


def model_card(title: str, description: str, load: str, files: dict[str, str]) -> str:
    """The README.md of a save_pretrained folder: what the model is, how to load it, what each file holds.

    Args:
        title: the model's name.
        description: a sentence or two on what it does and how it was made.
        load: Python that loads the folder (the folder is called FOLDER in it).
        files: file name -> what it holds.
    """
    try:  # from the install's metadata: importing the package here would import the models, which import this
        version = importlib.metadata.version("vfusion3d-lightning")
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    listed = "\n".join(f"- `{name}`: {text}" for name, text in files.items())
    return (f"# {title}\n\n{description}\n\nWritten by vfusion3d-lightning {version}. Load it with:\n\n"
            f"```python\n{load}\n```\n\nwhere FOLDER is this folder's path (a Lightning `.ckpt` of the module "
            f"that trained it loads the same way).\n\n## Files\n\n{listed}\n- `README.md`: this card.\n")
