"""Where weights come from and how every model reads them.

- the registry of known pretrained weights (`checkpoints/registry.yaml`, shipped inside the package:
  `presets.registry_path()`) and `checkpoint_dir()`, the folder its files are looked up in;
- `locate_weights`: a path as given, a Hugging Face Hub repo id -> its files in the Hugging Face cache
  (`hub_snapshot_files`), or a registry name -> its file, sha256-checked once (`file_sha256`);
- `missing_weights_error`: the one error for weights that are not there (what, where from, where to put it);
- `load_state_file`: tensors from a file without running code from it;
- `read_lightning_checkpoint`: a LightningModule's `.ckpt` -> its hyper-parameters and its network's weights,
  which every model's `from_pretrained` builds itself from;
- `load_state_into`: strict loading whose error names every missing, extra and mis-shaped key;
- `model_card`: the README.md of a `save_pretrained` folder (Hub metadata in YAML front matter);
- `PushToHubMixin`: `push_to_hub`, the same for every model: `save_pretrained` then upload that folder.

How `from_pretrained(source)` reads a string: an existing path wins; else `org/name` is a Hub repo id; else a
plain word is a registry name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file as load_safetensors

from vfusion3d_lightning import presets
from vfusion3d_lightning.io import atomic_write

CHECKPOINT_DIR_ENV = "VFUSION3D_CHECKPOINTS"
LIGHTNING_SUFFIX = ".ckpt"
VERIFIED_SUFFIX = ".sha256-verified"  # beside a hashed file: its digest, valid while its size and mtime hold
LIBRARY_NAME = "vfusion3d-lightning"
# `org/name` as the Hub spells repo ids (letters, digits, `-`, `_`, `.`)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "on", "yes", "true"}
# a missing `runs/lrm.ckpt` is a mistyped path, not a repo id: it gets the path's error, with no network call
FILE_SUFFIXES = frozenset({".ckpt", ".pth", ".pt", ".bin", ".safetensors", ".skops", ".json", ".yaml"})
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


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, hashed once: the digest is recorded beside it (`<file>.sha256-verified`, with the
    file's size and mtime) and read back while both are unchanged, so loading a multi-GB checkpoint again does
    not read it twice. A folder that cannot be written to just hashes every time.

    Args:
        path: the file.
    """
    path = Path(path)
    stat = path.stat()  # of the file a link points to (the Hugging Face cache links snapshots to blobs)
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = path.with_name(path.name + VERIFIED_SUFFIX)
    try:
        saved = json.loads(record.read_text())
        if isinstance(saved, dict) and all(saved.get(k) == v for k, v in key.items()) \
                and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_of(path)
    try:
        atomic_write(record, lambda tmp: tmp.write_text(json.dumps({**key, "sha256": digest}) + "\n"))
    except OSError:
        pass  # read-only checkpoints: correct, only slower
    return digest


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
        digest = file_sha256(path)
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


def is_hub_repo_id(source: str | os.PathLike) -> bool:
    """Whether `source` reads as a Hugging Face Hub repo id: a string `org/name` that is not an existing path,
    whose `org` is not an existing folder, and that does not end in a weights or config file's suffix
    (`FILE_SUFFIXES`).

    Args:
        source: what a caller was given.
    """
    # `runs/lrm` beside an existing `runs/` is a mistyped path: no network wait for it
    return (isinstance(source, str) and bool(_REPO_ID.match(source)) and Path(source).suffix not in FILE_SUFFIXES
            and not Path(source).expanduser().exists() and not Path(source.split("/")[0]).is_dir())


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face cache: `cache_dir`, else $HF_HUB_CACHE as set now, else huggingface_hub's default
    (from $HF_HOME, by default ~/.cache/huggingface/hub)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """$HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import); unset, huggingface_hub's value."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return value.strip().lower() in _TRUE if value is not None else bool(constants.HF_HUB_OFFLINE)


def hub_snapshot_files(repo_id: str, filenames: Sequence[str], revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                       what: str = "weights") -> Path:
    """The local snapshot folder of a Hub model repo holding `filenames`, fetched into the Hugging Face cache
    by huggingface_hub as every HF library does (an up-to-date cached copy is not downloaded again; offline,
    $HF_HUB_OFFLINE=1, only the cache is read). A file that cannot be had is `missing_weights_error`: one line
    naming the repo, the file and the `hf download` command that fetches it.

    Args:
        repo_id: `org/name`.
        filenames: files of the repo, each fetched with `hf_hub_download`; a name holding `*` is a pattern, and
            then the matching files are fetched with `snapshot_download` (a diffusers folder).
        revision: a branch, tag or commit hash (default: the repo's main branch).
        cache_dir: the Hugging Face cache (default: `hub_cache_dir()`).
        token: a Hub token for private or gated repos (default: huggingface_hub's login, $HF_TOKEN).
        what: what the files are, for the error ("LRM weights").
    """
    from huggingface_hub import errors, hf_hub_download, snapshot_download

    cache, offline = hub_cache_dir(cache_dir), hub_offline()
    options = dict(revision=revision, cache_dir=cache, token=token, local_files_only=offline,
                   library_name=LIBRARY_NAME)
    patterns = [name for name in filenames if "*" in name]
    current = "the files it needs" if patterns else None
    try:
        if patterns:
            return Path(snapshot_download(repo_id, allow_patterns=list(filenames), **options))
        folder = None
        for current in filenames:
            path = Path(hf_hub_download(repo_id, current, **options))
            folder = folder or path.parents[len(Path(current).parts) - 1]
        return folder
    except (errors.HfHubHTTPError, errors.EntryNotFoundError, errors.LocalEntryNotFoundError,
            errors.HFValidationError, OSError, ValueError) as err:
        raise _hub_error(repo_id, current, filenames, revision, cache_dir, cache, offline, what, err) from None


def _hub_error(repo_id: str, name: str, filenames: Sequence[str], revision: str | None,
               cache_dir: str | os.PathLike | None, cache: Path, offline: bool, what: str,
               err: BaseException) -> FileNotFoundError:
    from huggingface_hub import errors

    if isinstance(err, errors.GatedRepoError):
        reason = "the repo is gated: accept its terms on huggingface.co and pass token= or log in with `hf auth login`"
    elif isinstance(err, errors.RepositoryNotFoundError):
        reason = "the Hub has no such repo, or it is private: pass token= or log in with `hf auth login`"
    elif isinstance(err, errors.RevisionNotFoundError):
        reason = f"the repo has no revision {revision!r}"
    elif isinstance(err, errors.LocalEntryNotFoundError) or offline:
        reason = ("$HF_HUB_OFFLINE is set and the cache has no copy" if offline
                  else "no network and the cache has no copy")
    elif isinstance(err, errors.EntryNotFoundError):
        reason = "the repo has no such file"
    else:
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    at = f" at revision {revision!r}" if revision else ""
    # the command fetches every file the loader needs, not only the one that failed (a folder: the whole repo)
    whole = any("*" in f for f in filenames)
    command = " ".join(["hf download", repo_id, *([] if whole else filenames),
                        *([f"--revision {revision}"] if revision else []),
                        *([f"--cache-dir {cache}"] if cache_dir is not None else [])])
    return missing_weights_error(
        f"{what}: {name} of Hugging Face Hub repo {repo_id!r}{at} ({reason})",
        f"it with `{command}` on a machine with network access", f"the Hugging Face cache {cache}",
        f"or set HF_HUB_CACHE to a cache that holds it; or, if {repo_id!r} is meant as a local path, it does not exist")


def locate_weights(source: str | os.PathLike, directory: str | os.PathLike | None = None, *,
                   what: str = "weights", expected: str | None = None, fetch: str | None = None,
                   converters: Iterable[str] | None = None, hub_files: Sequence[str] | None = None,
                   revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   token: str | bool | None = None) -> tuple[WeightsEntry | None, Path]:
    """An existing path as it is (no entry); else, given `hub_files`, the snapshot folder of a Hub repo id
    (`hub_snapshot_files`, no entry); else the registry entry and file of a name.

    Args:
        source: a file or folder, or a registry name.
        directory: the checkpoint folder registry names resolve in (default: `checkpoint_dir()`).
        what: what the weights are, for messages ("LRM weights").
        expected: what `source` may be, for the error of a path that does not exist.
        fetch: where the weights come from; given, a path that does not exist is `missing_weights_error`
            (fetch them, save them there) rather than a mistyped path.
        converters: the registry converters the caller reads; an entry of another is refused, naming what
            loads it.
        hub_files: the files a repo id must provide (see `hub_snapshot_files`); None: repo ids are not taken.
        revision, cache_dir, token: for a repo id, as `hub_snapshot_files` takes them.
    """
    path = Path(source).expanduser()
    if hub_files is not None and is_hub_repo_id(source):
        return None, hub_snapshot_files(str(source), hub_files, revision, cache_dir, token, what)
    if revision is not None:  # an existing path of a repo id's spelling wins: say so rather than ignore revision
        raise ValueError(f"revision={revision!r} applies to Hugging Face Hub repo ids (org/name that is not an "
                         f"existing path), not to {source!r}")
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


# what `card_data` may hold: Hub metadata (license, tags, datasets, base_model) and the card's sections
CARD_FIELDS = ("license", "tags", "datasets", "base_model", "training_data", "recipe", "metrics")
NOT_RECORDED = "not recorded"


def model_card(title: str, description: str, load: str, files: dict[str, str], *, pipeline_tag: str,
               tags: Sequence[str] = (), card_data: dict[str, Any] | None = None) -> str:
    """The README.md of a save_pretrained folder: Hub metadata as YAML front matter (license, library_name,
    tags, pipeline_tag), what the model is, how to load it, what each file holds, and its training data,
    recipe and metrics ("not recorded" where `card_data` does not give them).

    Args:
        title: the model's name.
        description: a sentence or two on what it does and how it was made.
        load: Python that loads the folder (the folder is called FOLDER in it).
        files: file name -> what it holds.
        pipeline_tag: the Hub task ("image-to-3d").
        tags: the model's own Hub tags, after the library's.
        card_data: any of CARD_FIELDS: `license` (a Hub license id; default "unknown"), `tags`, `datasets`,
            `base_model` (Hub metadata); `training_data`, `recipe` (text) and `metrics` (name -> value), the
            card's sections.
    """
    card_data = dict(card_data or {})
    unknown = sorted(set(card_data) - set(CARD_FIELDS))
    if unknown:
        raise ValueError(f"card_data has unknown fields {unknown}; known: {list(CARD_FIELDS)}")
    metrics = card_data.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ValueError(f"card_data['metrics'] must map metric names to values, got {type(metrics).__name__}")
    try:  # from the install's metadata: importing the package here would import the models, which import this
        version = importlib.metadata.version(LIBRARY_NAME)
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed)"
    front = {"license": card_data.get("license") or "unknown", "library_name": LIBRARY_NAME,
             "tags": list(dict.fromkeys(["vfusion3d", LIBRARY_NAME, *tags, *card_data.get("tags", ())])),
             "pipeline_tag": pipeline_tag}
    front.update({k: card_data[k] for k in ("datasets", "base_model") if card_data.get(k)})
    listed = "\n".join(f"- `{name}`: {text}" for name, text in files.items())
    table = "\n".join(["| metric | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in metrics.items())])
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {title}\n\n{description}\n\n"
            f"Written by vfusion3d-lightning {version}. Load it with:\n\n```python\n{load}\n```\n\nwhere FOLDER is "
            f"this folder's path or the Hub repo id it was pushed to (a Lightning `.ckpt` of the module that trained "
            f"it loads the same way).\n\n## Training data\n\n{card_data.get('training_data') or NOT_RECORDED}\n\n"
            f"## Recipe\n\n{card_data.get('recipe') or NOT_RECORDED}\n\n"
            f"## Metrics\n\n{table if metrics else NOT_RECORDED}\n\n"
            f"## Files\n\n{listed}\n- `README.md`: this card.\n")


class PushToHubMixin:
    """`push_to_hub` for every model that has `save_pretrained(directory, card_data=None)`: the repo gets
    exactly the files `save_pretrained` writes, so `from_pretrained(repo_id)` reads it as it reads the folder."""

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    commit_message: str | None = None, card_data: dict[str, Any] | None = None,
                    revision: str | None = None):
        """Write the model with `save_pretrained` into a fresh temporary folder, create the Hub repo if it does
        not exist, and upload that folder as one commit (huggingface_hub). Returns huggingface_hub's CommitInfo.

        Args:
            repo_id: `org/name` (or `name`, under the token's user).
            token: a Hub token with write access (default: huggingface_hub's login, $HF_TOKEN).
            private: create the repo private (an existing repo keeps its visibility).
            commit_message: the commit's message (default: "Upload <class> with vfusion3d-lightning").
            card_data: what the model card records (see `model_card`: license, training data, recipe, metrics).
            revision: the branch to commit to (default: main).
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="vfusion3d-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", card_data=card_data)  # before the repo exists
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                     commit_message=commit_message or f"Upload {type(self).__name__} with "
                                                                      f"{LIBRARY_NAME}")
