"""`vfusion3d-lightning sweep`: hyperparameter search over LightningCLI overrides, on Optuna.

    vfusion3d-lightning sweep --config sweeps/lr.yaml          # a YAML of this command's arguments:

    configs: [configs/lrm/tiny.yaml]
    out: outputs/sweeps/lr
    monitor: val/lpips
    grid: {model.init_args.lr: [1.0e-4, 4.0e-4], model.init_args.lpips_weight: [0.5, 1.0]}
    overrides: {trainer.max_epochs: 2}

Keys are LightningCLI's dotted keys (`model.init_args.lr`, `trainer.max_epochs`, as `fit --print_config`
shows them) with YAML/JSON values, the syntax of the pipeline's `overrides:`. Every key is checked against
the composed config before any trial starts, so a misspelt key fails at once, naming close matches.

Each trial is `vfusion3d-lightning fit --config CONFIG... --KEY=VALUE... --trainer.default_root_dir
OUT/<trial>` in a fresh Python process (no shared global state or GPU memory) with two callbacks appended:
`SweepResult` (writes OUT/<trial>/sweep_result.json: the metrics of every validation) and `OptunaPruning`
(reports the monitored metric to the study after every validation and stops the run when the pruner says so).
`n_jobs` trials run at once, one process each; when GPUs are visible each gets one (CUDA_VISIBLE_DEVICES,
round-robin over the worker slots).

The study lives in an Optuna RDB (default `sqlite:///OUT/study.db`; a PostgreSQL URL lets several machines
work on one study): rerunning the same command goes on with it. COMPLETE and PRUNED trials are kept; trials
left RUNNING by a killed sweep (its process gone on this host, or no heartbeat for 3 minutes from another
host) are marked FAIL, and the points of failed trials are run again (grid: every combination without a
finished trial; random/TPE: a failed trial's params are enqueued again before new ones are sampled). A
different search space (configs, overrides, grid, space, sampler, monitor, mode) against an existing study is
an error: give a new `out`.

OUT holds one folder per trial (`trial-007_lr=0.0001_lpips_weight=0.5`: the run's lightning_logs with
checkpoints and config.yaml, stdout.log, stderr.log, error.txt when it failed), `trials.json` (every trial's
params, state and command), `results.csv` / `results.md` (the trials ranked by the best `monitor` value over
their validations, with the other val/* metrics, status and run folder) and `ranking.png` (that ranking as a
bar chart).

Ablations are a `variants` sweep instead of grid/space: named sets of overrides, one trial each
(`trial-001_no_opacity`), compared with the first (configs/sweeps/paper_ablations_tiny.yaml):

    configs: [lrm/tiny]
    out: outputs/sweeps/ablations
    monitor: val/lpips
    variants:
      multistage: {}                                    # the reference: the configs as they are
      no_opacity: {model.init_args.opacity_weight: 0.0}

It writes, besides the above, `comparison.csv` / `comparison.md` (each variant's val/* metrics at its last
validation and their difference from the first variant's), `comparison.png` (a bar chart per metric) and
`curves.png` (each metric against the training step, a line per variant). Study, resume and retries work as
for a grid (the variant's name is the trial's one param).
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vfusion3d_lightning.io import atomic_write

RESULT_FILE = "sweep_result.json"  # = training.callbacks.SWEEP_RESULT_FILE (that module imports Lightning)
STORAGE_ENV = "VFUSION3D_SWEEP_STORAGE"  # = training.callbacks.SWEEP_STORAGE_ENV
RESULT_CALLBACK = "vfusion3d_lightning.training.callbacks.SweepResult"
PRUNING_CALLBACK = "vfusion3d_lightning.training.callbacks.OptunaPruning"
TRIALS_FILE = "trials.json"
STUDY_ATTR = "vfusion3d_sweep"  # the study's search space, checked on every rerun
RESERVED = {"trainer.default_root_dir": "the sweep sets it per trial to OUT/<trial>",
            "config": "give config files with `configs`",
            "ckpt_path": "not a config key of fit's parser"}
HEARTBEAT_S = 30.0  # a running trial's `heartbeat` user attr is refreshed this often
STALE_AFTER_S = 180.0  # a RUNNING trial of another host without a heartbeat this long is taken as dead
HOST = socket.gethostname()
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_NAME = 120
_STDERR_TAIL = 60  # lines of a failed trial's stderr copied into error.txt
_PLOT_MAX = 60  # trials shown in ranking.png
VARIANT = "variant"  # the one param of a `variants` sweep: the variant's name
COMPARISON_CSV, COMPARISON_MD = "comparison.csv", "comparison.md"
COMPARISON_PNG, CURVES_PNG = "comparison.png", "curves.png"
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ---------------------------------------------------------------------------------------------- values, names


def format_value(value: Any) -> str:
    """A value as LightningCLI reads it back: true/false/null, floats in Python's shortest form, lists as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def cli_value(value: Any) -> str:
    """A value on LightningCLI's command line, as the pipeline passes its overrides: text as it is, anything
    else as JSON (1e-05, true, null, [1, 2])."""
    return value if isinstance(value, str) else json.dumps(value)


def override_args(overrides: dict[str, Any]) -> list[str]:
    """{key: value} -> ["--key=value", ...] (`--key=value` keeps a value such as -1 from reading as an option)."""
    return [f"--{key}={cli_value(value)}" for key, value in overrides.items()]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix (`init_args` left out) that no other key shares: model.init_args.lr ->
    lr, or model.lr and data.lr when both are swept."""
    parts = {key: [p for p in key.split(".") if p != "init_args"] for key in keys}
    names = {}
    for key in keys:
        for k in range(1, len(parts[key]) + 1):
            name = ".".join(parts[key][-k:])
            if all(".".join(parts[other][-k:]) != name for other in keys if other != key):
                names[key] = name
                break
        else:
            names[key] = key
    return names


def trial_name(number: int, params: dict[str, Any], names: dict[str, str]) -> str:
    """`trial-007_lr=0.0001_lpips_weight=0.5`: the Optuna trial number and the params (floats to 4 significant
    digits), safe as a folder name (other characters become `-`), at most ~130 characters (the number keeps
    names unique)."""
    text = "_".join(f"{names[key]}={_short(value)}" for key, value in params.items())
    text = _UNSAFE.sub("-", text).strip("-")[:_MAX_NAME]
    return f"trial-{number:03d}" + (f"_{text}" if text else "")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


def _params_key(params: dict[str, Any]) -> str:
    """A trial's point of the search space, comparable across trials (True and 1 differ)."""
    return json.dumps(sorted((key, type(value).__name__, value) for key, value in params.items()))


# ---------------------------------------------------------------------------------------------- search space


@dataclass
class SearchSpace:
    """What a sweep varies: `grid` (key -> values, the values of categorical params; lists and dicts are kept
    as their JSON text, which the CLI reads the same) and `space` (key -> {type, low, high, log, step} or
    {type: categorical, choices}), in the order given; or `variants` (name -> overrides), each trial one named
    set of overrides, whose only param is `variant` (the name)."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [VARIANT] if self.variants else [*self.grid, *self.space]

    def points(self) -> list[dict[str, Any]]:
        """The grid's combinations, in order (the last key varies fastest); or the variants, in order."""
        if self.variants:
            return [{VARIANT: name} for name in self.variants]
        return [dict(zip(self.grid, combo)) for combo in itertools.product(*self.grid.values())]

    def overrides_of(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's params as config overrides: a variant's overrides, else the params themselves."""
        return dict(self.variants[params[VARIANT]]) if self.variants else dict(params)

    def trial_name(self, number: int, params: dict[str, Any]) -> str:
        """The trial's folder name: `trial-007_lr=0.0001` (`trial_name`), or `trial-002_no_opacity` for a variant."""
        if self.variants:
            return f"trial-{number:03d}_{params[VARIANT]}"
        return trial_name(number, params, short_names(self.keys))

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's params (enqueued ones come back as fixed; others are drawn by the study's sampler)."""
        if self.variants:
            return {VARIANT: trial.suggest_categorical(VARIANT, list(self.variants))}
        params = {key: trial.suggest_categorical(key, values) for key, values in self.grid.items()}
        for key, spec in self.space.items():
            if spec["type"] == "categorical":
                params[key] = trial.suggest_categorical(key, spec["choices"])
            elif spec["type"] == "int":
                params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step") or 1,
                                                log=spec["log"])
            else:
                params[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"),
                                                  log=spec["log"])
        return params

    def samples(self) -> list[dict[str, Any]]:
        """A few params that together use every grid value and each range's ends, or every variant (to check
        them)."""
        if self.variants:
            return self.points()
        count = max([len(values) for values in self.grid.values()] + [2 if self.space else 1])
        samples = []
        for i in range(count):
            params = {key: values[i % len(values)] for key, values in self.grid.items()}
            for key, spec in self.space.items():
                params[key] = (spec["choices"][i % len(spec["choices"])] if spec["type"] == "categorical"
                               else spec["low"] if i % 2 == 0 else spec["high"])
            samples.append(params)
        return samples

    def to_json(self) -> dict[str, Any]:
        # no `variants` key in a grid or space sweep: studies made before variants existed still match
        return {"variants": self.variants} if self.variants else {"grid": self.grid, "space": self.space}


def _encode(value: Any) -> Any:
    """A grid value as an Optuna categorical choice: scalars as they are, lists and dicts as compact JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _number(key: str, name: str, value: Any) -> int | float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as text
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"space {key}: {name} must be a number, got {value!r}")
    return value


def normalize_space(space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Checks each range and fills it in: {type: float|int, low, high, log, step} or {type: categorical,
    choices}. The type defaults to categorical with `choices`, int when low and high are ints, else float."""
    out = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            raise ValueError(f"space {key}: expected a mapping such as {{low: 1.0e-5, high: 1.0e-3, log: true}}, "
                             f"got {spec!r}")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ValueError(f"space {key}: unknown field(s) {', '.join(sorted(unknown))}; use type, low, high, "
                             "log, step or choices")
        kind = spec.get("type") or ("categorical" if "choices" in spec else None)
        if kind == "categorical" or "choices" in spec:
            choices = spec.get("choices")
            if kind not in (None, "categorical") or set(spec) - {"type", "choices"}:
                raise ValueError(f"space {key}: choices make a categorical param; give only type and choices")
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"space {key}: choices must be a non-empty list")
            out[key] = {"type": "categorical", "choices": _checked_values(f"space {key}", choices)}
            continue
        if "low" not in spec or "high" not in spec:
            raise ValueError(f"space {key}: give low and high (or choices)")
        low, high = _number(key, "low", spec["low"]), _number(key, "high", spec["high"])
        if kind is None:
            kind = "int" if isinstance(low, int) and isinstance(high, int) and not isinstance(spec.get("step"),
                                                                                             float) else "float"
        if kind not in ("int", "float"):
            raise ValueError(f"space {key}: type must be float, int or categorical, got {kind!r}")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if step is not None:
            step = _number(key, "step", step)
        if kind == "int":
            if low != int(low) or high != int(high) or (step is not None and step != int(step)):
                raise ValueError(f"space {key}: an int range needs whole low, high and step")
            low, high, step = int(low), int(high), None if step is None else int(step)
        else:
            low, high = float(low), float(high)
            step = None if step is None else float(step)
        if not low <= high:
            raise ValueError(f"space {key}: low {low} is above high {high}")
        if log and (low <= 0 or step is not None):
            raise ValueError(f"space {key}: a log range needs low > 0 and no step")
        if step is not None and step <= 0:
            raise ValueError(f"space {key}: step must be positive")
        out[key] = {"type": kind, "low": low, "high": high, "log": log, "step": step}
    return out


def _checked_values(where: str, values: list[Any]) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: give a non-empty list of values, e.g. [1.0e-4, 4.0e-4]")
    encoded, seen = [], set()
    for value in map(_encode, values):
        if (type(value), format_value(value)) in seen:  # True and 1 are different values here
            raise ValueError(f"{where}: {format_value(value)} is given twice")
        seen.add((type(value), format_value(value)))
        encoded.append(value)
    return encoded


def search_space(sampler: str, grid: dict[str, list[Any]] | None, space: dict[str, dict[str, Any]] | None,
                 overrides: dict[str, Any] | None, n_trials: int | None,
                 variants: dict[str, dict[str, Any]] | None = None) -> SearchSpace:
    """The checked search space of a sweep's arguments; conflicting or malformed arguments are errors."""
    grid, space, overrides = dict(grid or {}), dict(space or {}), dict(overrides or {})
    if variants is not None:
        return variant_space(sampler, grid, space, overrides, n_trials, variants)
    for where, keys in (("grid", grid), ("space", space), ("overrides", overrides)):
        for key in keys:
            base = key.removesuffix("+") if where == "overrides" else key
            if not isinstance(key, str) or not _KEY.fullmatch(base):
                raise ValueError(f"{where}: {key!r} is not a dotted config key such as model.init_args.lr")
            if base in RESERVED:
                raise ValueError(f"{where}: {base} cannot be swept or set: {RESERVED[base]}")
    for key in set(grid) & set(space):
        raise ValueError(f"{key} is both in grid and in space; keep one")
    for key in set(overrides) & (set(grid) | set(space)):
        raise ValueError(f"{key} is both swept and fixed (overrides); keep one")
    if sampler == "grid":
        if space:
            raise ValueError("space needs sampler random or tpe (the grid sampler runs the grid's combinations)")
        if not grid:
            raise ValueError("nothing to sweep: give grid {key: [values, ...]}")
    else:
        if not grid and not space:
            raise ValueError(f"nothing to sweep: give grid and/or space for the {sampler} sampler")
        if n_trials is None:
            raise ValueError(f"the {sampler} sampler needs n_trials")
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    return SearchSpace({key: _checked_values(f"grid {key}", values) for key, values in grid.items()},
                       normalize_space(space))


def variant_space(sampler: str, grid: dict[str, list[Any]], space: dict[str, dict[str, Any]],
                  overrides: dict[str, Any], n_trials: int | None,
                  variants: dict[str, dict[str, Any]]) -> SearchSpace:
    """The search space of a `variants` sweep: each variant a name (a folder name's part) and a mapping of config
    overrides applied after `overrides` (a variant's value of a key wins); the first is the reference the
    comparison table measures the others by."""
    if grid or space:
        raise ValueError("variants replace grid and space: give either variants (named sets of overrides) or "
                         "grid/space, not both")
    if sampler != "grid":
        raise ValueError(f"variants run every variant once, as the grid sampler does; drop sampler {sampler} "
                         "(or set it to grid)")
    if not isinstance(variants, dict) or not variants:
        raise ValueError("variants: give a mapping of names to overrides, e.g. {baseline: {}, no_opacity: "
                         "{model.init_args.opacity_weight: 0.0}}")
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    checked = {}
    for name, changes in variants.items():
        if not isinstance(name, str) or not _VARIANT_NAME.fullmatch(name) or len(name) > _MAX_NAME:
            raise ValueError(f"variants: {name!r} is not a usable name: letters, digits, `_`, `.` and `-` only "
                             "(it names the trial's folder)")
        if changes is None:
            changes = {}
        if not isinstance(changes, dict):
            raise ValueError(f"variants {name}: expected a mapping of config keys to values (or {{}} for none), "
                             f"got {changes!r}")
        for key in [*overrides, *changes]:
            base = key.removesuffix("+") if isinstance(key, str) else key
            if not isinstance(key, str) or not _KEY.fullmatch(base):
                raise ValueError(f"variants {name}: {key!r} is not a dotted config key such as model.init_args.lr")
            if base in RESERVED:
                raise ValueError(f"variants {name}: {base} cannot be set: {RESERVED[base]}")
        checked[name] = dict(changes)
    return SearchSpace(variants=checked)


# ---------------------------------------------------------------------------------------------- checking keys


def _config_keys(namespace) -> list[str]:
    keys = set()
    for key in namespace.keys():
        parts = key.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(keys - {"config"} - {k for k in keys if k.endswith("__path__")})


def _close_keys(key: str, known: list[str]) -> list[str]:
    """Up to 3 known keys like `key`: its siblings with a similar last part first (lrr -> lr), then keys as
    deep as it, then any."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    close = [siblings[name] for name in difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.6)]
    depth = key.count(".")
    return (close or difflib.get_close_matches(key, [k for k in known if k.count(".") == depth], n=3, cutoff=0.6)
            or difflib.get_close_matches(key, known, n=3, cutoff=0.6))


def check_overrides(configs: list[str], overrides: dict[str, Any], space: SearchSpace) -> None:
    """Raises ValueError before any trial runs when a key of `overrides`, `grid` or `space` is not in the
    config that `configs` compose (naming close matches), or when LightningCLI rejects a value."""
    import argparse

    from vfusion3d_lightning.training.lightning_cli import fit_parser  # Lightning only when a sweep runs

    parser = fit_parser()
    base = [word for config in configs for word in ("--config", str(config))]

    def parse(args: list[str], what: str):
        try:
            return parser.parse_args(base + args)
        except argparse.ArgumentError as err:
            raise ValueError(f"LightningCLI rejects {what} on {' + '.join(map(str, configs))}:\n{err}") from None

    def known_keys(changes: dict[str, Any]) -> list[str]:
        # a class_path override changes which init_args exist: apply those first
        class_paths = {key: value for key, value in changes.items() if key.endswith("class_path")}
        namespace = parse(override_args(class_paths), f"the overrides {class_paths}" if class_paths else "the configs")
        return _config_keys(namespace)

    known = known_keys(overrides)
    checks = [("overrides", list(overrides), known), ("grid", list(space.grid), known),
              ("space", list(space.space), known)]
    checks += [(f"variants {name}", list(changes), known_keys({**overrides, **changes}))
               for name, changes in space.variants.items()]
    for where, keys, known in checks:
        for key in keys:
            base_key = key.removesuffix("+")
            if base_key in known:
                continue
            close = _close_keys(base_key, known)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"{where}: {base_key!r} is not a key of the config {' + '.join(map(str, configs))}"
                             f"{hint} (`vfusion3d-lightning fit --config ... --print_config` shows every key)")
    for params in space.samples():
        changes = space.overrides_of(params)
        what = (f"variant {params[VARIANT]} ({json.dumps(changes)})" if space.variants
                else f"the values {json.dumps(params)}")
        parse(override_args(overrides) + override_args(changes), f"{what} (with the overrides {json.dumps(overrides)})")


# ---------------------------------------------------------------------------------------------- the study


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _make_sampler(name: str, space: SearchSpace, seed: int):
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial is enqueued, the sampler draws nothing


def open_study(storage: str, study_name: str, description: dict[str, Any], mode: str, out: Path):
    """Create the study, or load it and check it holds the same sweep."""
    import optuna

    from vfusion3d_lightning.training.callbacks import rdb_storage

    direction = "minimize" if mode == "min" else "maximize"
    study = optuna.create_study(storage=rdb_storage(storage), study_name=study_name, direction=direction,
                                load_if_exists=True)
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is None:
        if study.trials:
            raise ValueError(f"study {study_name!r} in {redact(storage)} holds trials of something else than a "
                             "sweep; give another study_name or out")
        study.set_user_attr(STUDY_ATTR, description)
        return study
    mine = json.loads(json.dumps(description, default=str))
    changed = [name for name in mine if stored.get(name) != mine[name]]
    if changed:
        details = "; ".join(f"{name}: {json.dumps(stored.get(name))} there, {json.dumps(mine[name])} now"
                            for name in changed)
        raise ValueError(f"{out} holds a sweep with another search space ({details}); give a new out (or another "
                         "study_name), or delete that folder to start over")
    return study


def _alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # cannot tell: the heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(trial, now: float | None = None) -> bool:
    """A RUNNING trial nobody runs any more: started by a sweep on this host whose process is gone, with no
    heartbeat for STALE_AFTER_S, or not started by a sweep at all."""
    attrs = trial.user_attrs
    host, pid, beat = attrs.get("host"), attrs.get("pid"), attrs.get("heartbeat")
    if host is None or pid is None or beat is None:
        return True
    if host == HOST and (pid == os.getpid() or not _alive(pid)):
        return True
    return (now or time.time()) - beat > STALE_AFTER_S


def fail_stale_trials(study, out: Path) -> list[int]:
    """Mark RUNNING trials left by a killed sweep FAIL (their points run again); returns their numbers."""
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial):
            continue
        reason = "the sweep that ran it stopped (killed?) before it finished; it is run again"
        study._storage.set_trial_user_attr(trial._trial_id, "error", reason)
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        folder = trial.user_attrs.get("folder")
        if folder and (out / folder).is_dir() and not (out / folder / "error.txt").exists():
            _write_text(out / folder / "error.txt", f"{folder}: {reason}\n")
        failed.append(trial.number)
    return failed


def _trial_params(trial) -> dict[str, Any]:
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))


# ---------------------------------------------------------------------------------------------- running


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a (possibly large) text file."""
    if not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def config_file(config: str | os.PathLike) -> str:
    """A config of `configs`: a YAML file's path, or the name of a shipped config (`lrm/tiny`), as `fit --config`
    takes them; the shipped sweeps name their configs so, which works in a wheel install too."""
    if Path(config).is_file():
        return str(config)
    from vfusion3d_lightning.presets import shipped_config

    try:
        return str(shipped_config(str(config)))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"configs: {config}: no such file, nor a shipped config ({err})") from None


def trial_command(configs: list[str], overrides: dict[str, Any], params: dict[str, Any], folder: Path,
                  study_name: str, number: int, monitor: str, pruner: str,
                  pruner_args: dict[str, Any] | None) -> list[str]:
    """The `fit` arguments of one trial (after `python -m vfusion3d_lightning.cli`)."""
    pruning = {"class_path": PRUNING_CALLBACK,
               "init_args": {"study_name": study_name, "trial_number": number, "monitor": monitor,
                             "pruner": pruner, "pruner_args": pruner_args or {}}}
    return ["fit", *[word for config in configs for word in ("--config", str(config))], *override_args(overrides),
            *override_args(params), f"--trainer.default_root_dir={folder}",
            f"--trainer.callbacks+={RESULT_CALLBACK}",
            f"--trainer.callbacks+={json.dumps(pruning, separators=(',', ':'))}"]


class _Processes:
    """The trials' running processes, to kill on Ctrl-C."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running: dict[int, subprocess.Popen] = {}
        self.closed = False  # after kill_all, a process that starts is killed at once

    def kill_all(self) -> None:
        with self.lock:
            self.closed = True
            for process in self.running.values():
                if process.poll() is None:
                    process.kill()


def run_trial(command: list[str], folder: Path, timeout: float | None = None, env: dict[str, str] | None = None,
              processes: _Processes | None = None) -> int:
    """Run `python -m vfusion3d_lightning.cli <command>` in a fresh process, stdout and stderr to
    folder/stdout.log and folder/stderr.log. Returns the exit code (-9 on timeout)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with open(folder / "stdout.log", "wb") as stdout, open(folder / "stderr.log", "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "vfusion3d_lightning.cli", *command], stdout=stdout,
                                   stderr=stderr, env=env)
        if processes is not None:
            with processes.lock:
                processes.running[id(process)] = process
                if processes.closed:
                    process.kill()
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            stderr.write(f"\n[sweep] killed after the timeout of {timeout} s\n".encode())
            return -9
        except BaseException:  # Ctrl-C: do not leave a training behind
            process.kill()
            process.wait()
            raise
        finally:
            if processes is not None:
                with processes.lock:
                    processes.running.pop(id(process), None)


def load_result(folder: Path) -> dict | None:
    """A finished trial's sweep_result.json, or None (not run, failed, or unfinished)."""
    try:
        return json.loads((folder / RESULT_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def best_entry(result: dict, monitor: str, mode: str) -> dict | None:
    """The validation (epoch, step, metrics) with the best `monitor` value; the end-of-fit metrics when no
    validation logged it; None when it was never logged as a finite number."""
    entries = [e for e in result.get("history", []) if _finite(e["metrics"].get(monitor))]
    if not entries:
        final = result.get("metrics", {})
        return {"epoch": result.get("epochs"), "step": result.get("global_step"), "metrics": final} \
            if _finite(final.get(monitor)) else None
    pick = min if mode == "min" else max
    return pick(entries, key=lambda e: e["metrics"][monitor])  # the first of equal values


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Outcome:
    state: str  # COMPLETE, PRUNED or FAIL
    value: float | None = None  # the best monitored value
    best: dict[str, Any] | None = None  # {value, epoch, step, metrics (the other val/* metrics)}
    run_dir: str | None = None
    error: str | None = None
    monitor_missing: bool = False  # finished, but never logged the monitor at all


def trial_outcome(code: int, result: dict | None, monitor: str, mode: str, out: Path) -> Outcome:
    """What a trial's exit code and sweep_result.json make of it."""
    if code != 0 or result is None:
        if code == -9:
            return Outcome("FAIL", error="killed after the timeout")
        return Outcome("FAIL", error=f"exit code {code}" + ("" if code else f" but no {RESULT_FILE} was written"))
    run_dir = _relative(result["log_dir"], out) if result.get("log_dir") else None
    entry = best_entry(result, monitor, mode)
    best = None
    if entry is not None:
        value = float(entry["metrics"][monitor])
        best = {"value": value, "epoch": entry.get("epoch"), "step": entry.get("step"),
                "metrics": {k: v for k, v in entry["metrics"].items() if k.startswith("val") and k != monitor}}
    if result.get("pruned"):
        return Outcome("PRUNED", best and best["value"], best, run_dir)
    if best is not None:
        return Outcome("COMPLETE", best["value"], best, run_dir)
    logged = sorted(set(result.get("metrics", {})).union(*(e["metrics"] for e in result.get("history", []))))
    if monitor in logged:
        return Outcome("FAIL", run_dir=run_dir, error=f"{monitor} was never a finite number (the run diverged?)")
    return Outcome("FAIL", run_dir=run_dir, monitor_missing=True,
                   error=f"the run never logged {monitor} (logged: {', '.join(logged) or 'nothing'}); check monitor, "
                         "and that validation runs (check_val_every_n_epoch <= max_epochs)")


def _relative(path: str, out: Path) -> str:
    try:
        return os.path.relpath(path, out)
    except ValueError:  # another drive on Windows
        return path


def visible_gpus() -> list[str]:
    """The GPUs a trial may be given: CUDA_VISIBLE_DEVICES's entries when set, else every CUDA device."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and not d.strip().startswith("-")]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA build, no driver
        return []


# ---------------------------------------------------------------------------------------------- the table


def results_rows(trials: list, monitor: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial the sweep started, ranked: COMPLETE trials by their best `monitor` value (mode min or
    max), then PRUNED ones by theirs, then failed and running ones by number; ties keep the trials' order."""
    rows = []
    for trial in sorted(trials, key=lambda t: t.number):
        folder = trial.user_attrs.get("folder")
        if folder is None:
            continue  # WAITING, or not a sweep's trial
        best = trial.user_attrs.get("best") or {}
        rows.append({"trial": folder, "number": trial.number, "params": _trial_params(trial),
                     "status": trial.state.name, "monitor": best.get("value"), "metrics": best.get("metrics", {}),
                     "epoch": best.get("epoch"), "run_dir": trial.user_attrs.get("run_dir") or folder,
                     "error": trial.user_attrs.get("error")})
    sign = 1 if mode == "min" else -1

    def order(row):
        group = {"COMPLETE": 0, "PRUNED": 2}.get(row["status"], 4)
        if group < 4 and not _finite(row["monitor"]):
            group += 1
        return (group, sign * row["monitor"] if group in (0, 2) else 0.0)

    return sorted(rows, key=order)


def _cell(value: Any, digits: int | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and digits:
        return f"{value:.{digits}g}"
    return repr(value) if isinstance(value, float) else format_value(value)


def table(rows: list[dict[str, Any]], keys: list[str], monitor: str, markdown: bool) -> tuple[list[str], list[list]]:
    """Header and cells of the results table; `markdown` uses short key names and 4 significant digits."""
    names = short_names(keys) if markdown else {key: key for key in keys}
    metrics = sorted(set().union(*(row["metrics"] for row in rows)))
    header = ["trial", *(names[key] for key in keys), monitor, *metrics, "epoch", "status", "run folder"]
    digits = 4 if markdown else None
    cells = [[row["trial"], *(_cell(row["params"].get(key), digits) for key in keys), _cell(row["monitor"], digits),
              *(_cell(row["metrics"].get(m), digits) for m in metrics), _cell(row["epoch"]), row["status"],
              row["run_dir"]] for row in rows]
    return header, cells


def write_results(rows: list[dict[str, Any]], keys: list[str], monitor: str, mode: str, out: Path) -> str:
    """OUT/results.csv, OUT/results.md and OUT/ranking.png (atomic); returns the Markdown table."""
    header, cells = table(rows, keys, monitor, markdown=False)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(cells)
    _write_text(out / "results.csv", buffer.getvalue())
    header, cells = table(rows, keys, monitor, markdown=True)
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += [f"| {' | '.join(str(c).replace('|', '/') for c in row)} |" for row in cells]
    text = (f"Ranked by {monitor} ({mode}; best value over the validations of each trial; pruned trials after "
            "complete ones).\n\n" + "\n".join(lines))
    _write_text(out / "results.md", text + "\n")
    plot_ranking(rows, keys, monitor, mode, out / "ranking.png")
    return text


def bar_limits(values: list[float]) -> tuple[tuple[float, float], bool]:
    """The value axis of a bar chart, and whether it starts elsewhere than 0: where the values are close, bars
    from 0 would all look the same."""
    low, high = min(values), max(values)
    zoom = (low > 0 or high < 0) and (high - low) < 0.25 * max(abs(low), abs(high))
    if zoom:
        spread = (high - low) or 0.1 * abs(high)
        if low > 0:
            return (low - 0.6 * spread, high + 0.35 * spread), True
        return (low - 0.35 * spread, high + 0.6 * spread), True
    low, high = min(0.0, low), max(0.0, high)
    return (low - 0.02 * (high - low), high + 0.15 * (high - low or 1.0)), False


def plot_ranking(rows: list[dict[str, Any]], keys: list[str], monitor: str, mode: str, path: Path) -> Path:
    """A horizontal bar chart of the monitored value per trial, best at the top (pruned trials hatched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    shown = [row for row in rows if row["status"] in ("COMPLETE", "PRUNED") and _finite(row["monitor"])]
    hidden = len(rows) - len(shown)
    shown = shown[:_PLOT_MAX]
    names = short_names(keys)
    labels = []
    for row in shown:
        text = ", ".join(f"{names[k]}={_short(row['params'].get(k))}" for k in keys)
        labels.append(f"#{row['number']}  {text[:60] + '…' if len(text) > 61 else text}")
    figure = Figure(figsize=(9, 1.4 + 0.32 * max(1, len(shown))), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    zoom = False
    if shown:
        values = [row["monitor"] for row in shown]
        colours = ["tab:blue" if row["status"] == "COMPLETE" else "tab:gray" for row in shown]
        if shown[0]["status"] == "COMPLETE":
            colours[0] = "tab:green"  # the best trial
        bars = axes.barh(range(len(shown)), values, color=colours, height=0.7)
        for bar, row in zip(bars, shown):
            if row["status"] == "PRUNED":
                bar.set_hatch("//")
        axes.set_yticks(range(len(shown)), labels, fontsize=8)
        axes.invert_yaxis()  # best at the top
        axes.bar_label(bars, [f"{v:.4g}" for v in values], padding=3, fontsize=7)
        limits, zoom = bar_limits(values)
        axes.set_xlim(*limits)
        if any(row["status"] == "PRUNED" for row in shown):
            axes.legend(handles=[Patch(color="tab:green", label="best"), Patch(color="tab:blue", label="complete"),
                                 Patch(facecolor="tab:gray", hatch="//", label="pruned")], fontsize=8,
                        loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axes.text(0.5, 0.5, "no trial has a value yet", ha="center", va="center", transform=axes.transAxes)
        axes.set_yticks([])
    axes.set_xlabel(f"{monitor} (best over each trial's validations; {'lower' if mode == 'min' else 'higher'} is "
                    "better)" + ("; axis not from 0" if zoom else ""))
    note = []
    if len(rows) - hidden > _PLOT_MAX:
        note.append(f"best {_PLOT_MAX} of {len(rows) - hidden} shown")
    if hidden:
        note.append(f"{hidden} failed or unfinished not shown")
    axes.set_title(f"sweep ranking: {monitor}" + (f" ({'; '.join(note)})" if note else ""), fontsize=10)
    axes.grid(axis="x", alpha=0.3)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110))


def write_trials_file(study, description: dict[str, Any], storage: str, out: Path) -> None:
    trials = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if "folder" not in trial.user_attrs:
            continue
        command = trial.user_attrs.get("command", [])
        trials.append({"number": trial.number, "name": trial.user_attrs["folder"], "state": trial.state.name,
                       "params": _trial_params(trial), "value": trial.user_attrs.get("best", {}).get("value"),
                       "folder": str(out / trial.user_attrs["folder"]), "error": trial.user_attrs.get("error"),
                       "command": ["vfusion3d-lightning", *command]})
    plan = {"study_name": study.study_name, "storage": redact(storage), **description, "trials": trials}
    _write_text(out / TRIALS_FILE, json.dumps(plan, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- variants


def variant_results(rows: list[dict[str, Any]], names: list[str], out: Path) -> list[dict[str, Any]]:
    """One entry per variant, in `names`' order: its trial (a COMPLETE one if any, else its latest), status,
    validation history [(step, {val/* metric: value})] from the trial's sweep_result.json, and the metrics and
    step of its last validation (empty when it has none)."""
    entries = []
    for name in names:
        mine = sorted((row for row in rows if row["params"].get(VARIANT) == name), key=lambda row: row["number"])
        done = [row for row in mine if row["status"] == "COMPLETE"]
        row = (done or mine or [None])[-1]
        result = load_result(out / row["trial"]) if row else None
        history = [(entry.get("step"), {k: v for k, v in entry["metrics"].items() if k.startswith("val/")
                                        and _finite(v)}) for entry in (result or {}).get("history", [])]
        history = [(step, metrics) for step, metrics in history if metrics]
        last_step, last = history[-1] if history else (None, {})
        entries.append({"variant": name, "trial": row and row["trial"], "status": row["status"] if row else "NOT RUN",
                        "history": history, "step": last_step, "metrics": last})
    return entries


def write_comparison(rows: list[dict[str, Any]], names: list[str], monitor: str, mode: str, out: Path) -> str:
    """OUT/comparison.csv and .md (each variant's val/* metrics at its last validation, and minus the first
    variant's), OUT/comparison.png (a bar chart per metric) and OUT/curves.png (each metric against the training
    step, a line per variant); atomic. Returns the Markdown table."""
    entries = variant_results(rows, names, out)
    reference = entries[0]
    metrics = sorted(set().union(*(entry["metrics"] for entry in entries)),
                     key=lambda metric: (metric != monitor, metric))  # the monitor first
    header = ["variant", "status", "step"]
    for metric in metrics:
        header += [metric, f"Δ {metric}"]
    cells = []
    for entry in entries:
        row = [entry["variant"], entry["status"], entry["step"]]
        for metric in metrics:
            value, base = entry["metrics"].get(metric), reference["metrics"].get(metric)
            row += [value, value - base if value is not None and base is not None else None]
        cells.append(row)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([["" if cell is None else cell for cell in row] for row in cells])
    _write_text(out / COMPARISON_CSV, buffer.getvalue())
    better = "lower" if mode == "min" else "higher"
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for row in cells:
        shown = [_cell(cell, 4) for cell in row]
        for i in range(4, len(row), 2):  # differences with their sign
            shown[i] = "" if row[i] is None else _signed(row[i])
        lines.append(f"| {' | '.join(shown)} |")
    text = (f"Each variant's val/* metrics at its last validation (step), and Δ = that minus the reference, "
            f"`{reference['variant']}` (the first variant). {monitor}: {better} is better. results.md ranks the "
            "same trials by their best validation instead.\n\n" + "\n".join(lines))
    _write_text(out / COMPARISON_MD, text + "\n")
    plot_comparison(entries, metrics, monitor, mode, out / COMPARISON_PNG)
    plot_curves(entries, metrics, out / CURVES_PNG)
    return text


def _panels(count: int, width: float, height: float):
    """A figure of `count` panels, up to 3 a row; returns (figure, list of axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, max(1, count))
    rows = (max(1, count) + columns - 1) // columns
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten().tolist()
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes[:max(1, count)]


def plot_comparison(entries: list[dict[str, Any]], metrics: list[str], monitor: str, mode: str, path: Path) -> Path:
    """A bar chart per metric: each variant's value at its last validation (labelled with its difference from
    the reference), the reference (first) variant in green with a dashed line at its value; a variant without a
    value has no bar. Close values get an axis that does not start at 0 (said under the panel)."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _panels(len(metrics), 5.2, 0.9 + 0.42 * len(entries))
    labels = [entry["variant"] for entry in entries]
    for ax, metric in zip(axes, metrics):
        values = [entry["metrics"].get(metric) for entry in entries]
        shown = [i for i, value in enumerate(values) if value is not None]
        colours = ["tab:green" if i == 0 else "tab:blue" for i in shown]
        bars = ax.barh(shown, [values[i] for i in shown], color=colours, height=0.7)
        texts = [f"{values[i]:.4g}" + (f" ({_signed(values[i] - values[0])})" if i and values[0] is not None
                                       else "") for i in shown]
        ax.bar_label(bars, texts, padding=3, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylim(len(labels) - 0.5, -0.5)  # the first variant at the top
        if values[0] is not None:
            ax.axvline(values[0], color="tab:green", linestyle="--", linewidth=1)
        zoom = False
        if shown:
            (low, high), zoom = bar_limits([values[i] for i in shown])
            ax.set_xlim(low, high + 0.3 * (high - low))  # room for the labels
        note = f" ({'lower' if mode == 'min' else 'higher'} is better)" if metric == monitor else ""
        ax.set_title(metric + note, fontsize=9)
        ax.set_xlabel("axis not from 0" if zoom else "", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    if not metrics:
        axes[0].text(0.5, 0.5, "no variant has a validation yet", ha="center", va="center",
                     transform=axes[0].transAxes)
    figure.suptitle(f"variants at their last validation (reference: {entries[0]['variant']}, green)", fontsize=10)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110))


def _signed(difference: float) -> str:
    return "±0" if difference == 0 else f"{difference:+.2g}"


def _variant_colour(index: int) -> str:
    """Green for the reference (the first variant), the others' colours never green."""
    others = ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive",
              "tab:cyan"]
    return "tab:green" if index == 0 else others[(index - 1) % len(others)]


def plot_curves(entries: list[dict[str, Any]], metrics: list[str], path: Path) -> Path:
    """Each metric against the training step, a line per variant (its validations as points)."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _panels(len(metrics), 4.6, 3.2)
    for ax, metric in zip(axes, metrics):
        for index, entry in enumerate(entries):
            points = [(step, values[metric]) for step, values in entry["history"]
                      if metric in values and step is not None]
            if points:
                steps, values = zip(*points)
                # the reference wide and under the others: a variant on the same values leaves it showing
                ax.plot(steps, values, marker="o", markersize=8 if index == 0 else 3.5, linewidth=3 if index == 0
                        else 1.2, color=_variant_colour(index), label=entry["variant"], zorder=1 if index == 0 else 2)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    if metrics:
        axes[0].legend(fontsize=7)
    else:
        axes[0].text(0.5, 0.5, "no variant has a validation yet", ha="center", va="center",
                     transform=axes[0].transAxes)
    figure.suptitle(f"validation curves (reference: {entries[0]['variant']}, green)", fontsize=10)
    return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110))


# ---------------------------------------------------------------------------------------------- the command


class _Scheduler:
    """Hands out the next trial (study.ask) to the worker threads: the grid's combinations that no COMPLETE,
    PRUNED, RUNNING or WAITING trial covers, in order; for random/TPE, the params of earlier failed trials, then
    the sampler's draws, until the study has n_trials trials done or running. A point is started at most once
    by one sweep process (a trial that fails now is retried by the next rerun)."""

    def __init__(self, study, space: SearchSpace, sampler: str, n_trials: int | None):
        self.study, self.space, self.sampler, self.n_trials = study, space, sampler, n_trials
        self.tried: set[str] = set()
        self.stopped = False
        self.cap = self._plan()[1]
        self.launched = 0

    def _plan(self) -> tuple[dict[str, Any] | None, int]:
        """The point to enqueue next (None: let the sampler draw) and how many trials are left to start."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        busy = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        covered = {_params_key(_trial_params(t)) for t in trials if t.state in busy}
        if self.sampler == "grid":
            points = self.space.points()
            keys = {_params_key(p) for p in points}
            pending = [p for p in points if _params_key(p) not in covered | self.tried]
            left = len(pending)
            if self.n_trials is not None:
                left = min(left, self.n_trials - len(covered & keys))
            return (pending[0] if pending else None), max(0, left)
        left = self.n_trials - sum(t.state in busy for t in trials)
        retry = None
        for trial in sorted(trials, key=lambda t: t.number):
            params = _trial_params(trial)
            key = _params_key(params)
            if trial.state == TrialState.FAIL and set(params) == set(self.space.keys) and key not in covered \
                    and key not in self.tried:
                retry = params
                break
        return retry, max(0, left)

    def next(self):
        """(trial, params) to run next, or None when done."""
        from optuna.trial import TrialState

        if self.stopped or self.launched >= self.cap:
            return None
        point, left = self._plan()
        if left <= 0 or (self.sampler == "grid" and point is None):
            return None
        if point is not None and not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.study.enqueue_trial(point)
        trial = self.study.ask()
        params = self.space.suggest(trial)
        self.tried.add(_params_key(params))
        self.launched += 1
        return trial, params


def sweep(configs: list[str], out: str, monitor: str, mode: Literal["min", "max"] = "min",
          grid: dict[str, list[Any]] | None = None, space: dict[str, dict[str, Any]] | None = None,
          overrides: dict | None = None, sampler: Literal["grid", "random", "tpe"] = "grid",
          n_trials: int | None = None, n_jobs: int = 1, storage: str | None = None, study_name: str = "sweep",
          pruner: Literal["none", "median", "hyperband"] = "none", pruner_args: dict[str, Any] | None = None,
          seed: int = 0, timeout: float | None = None, dry_run: bool = False,
          progress: bool = True, variants: dict[str, dict] | None = None) -> dict[str, Any]:
    """Search hyperparameters of a LightningCLI config with Optuna: each trial is one `fit` in its own process
    and folder, the trials are ranked by a logged validation metric, and a rerun resumes the study.

    Args:
        configs: LightningCLI config files of every trial, composed in order as with `fit --config A --config B`.
        out: the sweep folder: one run folder per trial, study.db (the default storage), trials.json,
            results.csv, results.md and ranking.png.
        monitor: the logged metric that ranks the trials and that Optuna optimises (its best value over a
            trial's validations), e.g. val/lpips.
        mode: min when lower `monitor` is better, max when higher is.
        grid: config key -> list of values (YAML/JSON), e.g. {model.init_args.lr: [1.0e-4, 4.0e-4]}: the
            combinations the grid sampler runs, and categorical params of the random and TPE samplers.
        space: config key -> range for the random and TPE samplers: {low, high, log, step, type} (type float
            or int, by default int when low and high are ints), or {choices: [...]} for a categorical param,
            e.g. {model.init_args.lr: {low: 1.0e-5, high: 1.0e-3, log: true}}.
        overrides: config key -> value fixed for every trial, e.g. {trainer.max_epochs: 2}; a key ending in
            `+` appends to a list (trainer.callbacks+). (Typed `dict`, not `dict[str, Any]`, here and in
            variants: jsonargparse would build the objects of `class_path` values of `Any`, such as a
            trainer.callbacks list, where the trials' LightningCLI needs their YAML.)
        sampler: grid (every combination of `grid`), random or tpe (Optuna's TPESampler); random and tpe need
            n_trials.
        n_trials: trials the study should have done (COMPLETE or PRUNED, counting earlier runs) or running;
            None with the grid sampler runs the whole grid.
        n_jobs: trials run at once, each in its own process; with GPUs visible each gets one
            (CUDA_VISIBLE_DEVICES, round-robin).
        storage: the study's Optuna RDB URL (default sqlite:///OUT/study.db); a PostgreSQL URL lets sweeps on
            several machines share one study (give each the same arguments).
        study_name: the study's name in the storage.
        pruner: none, median (Optuna's MedianPruner) or hyperband (HyperbandPruner): stops a trial whose
            monitored value after a validation is worse than the pruner allows.
        pruner_args: keyword arguments of the pruner, e.g. {n_startup_trials: 2, n_warmup_steps: 1} for median
            (its defaults wait for 5 finished trials).
        seed: seed of the random and TPE samplers (a rerun adds the number of trials so far).
        timeout: seconds after which a trial is killed and recorded as failed; None for no limit.
        dry_run: check the configs and keys, print the grid's trial commands (or the sweep's fixed part), and
            run nothing.
        progress: show a progress bar.
        variants: instead of grid and space, named sets of overrides, each one trial on top of `configs` and
            `overrides` (a variant's value of a key wins; folder `trial-NNN_<name>`), e.g. {multistage: {},
            no_opacity: {model.init_args.opacity_weight: 0.0}}; the first is the reference: OUT/comparison.csv
            and .md give every variant's val/* metrics at its last validation and their difference from the
            first's, and OUT/comparison.png (a bar chart per metric) and OUT/curves.png (each metric against the
            step, a line per variant) plot them. Runs every variant once, as the grid sampler does.

    Returns:
        A summary: the study name, counts of trials by state, the best trial and the results file.
    """
    import optuna

    if not configs:
        raise ValueError("give at least one LightningCLI config in configs")
    configs = [config_file(config) for config in configs]
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be at least 1, got {n_jobs}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be min or max, got {mode!r}")
    from vfusion3d_lightning.training.callbacks import make_pruner

    make_pruner(pruner, pruner_args)  # checks name and arguments
    overrides = dict(overrides or {})
    space_ = search_space(sampler, grid, space, overrides, n_trials, variants)
    check_overrides(configs, overrides, space_)
    out_dir = Path(out)
    description = json.loads(json.dumps({"configs": configs, "overrides": overrides, "sampler": sampler,
                                         **space_.to_json(), "monitor": monitor, "mode": mode}, default=str))

    if dry_run:
        if sampler == "grid":
            points = space_.points()[:n_trials]
            for number, params in enumerate(points):
                folder = out_dir / space_.trial_name(number, params)
                command = trial_command(configs, overrides, space_.overrides_of(params), folder, study_name, number,
                                        monitor, pruner, pruner_args)
                print(shlex.join(["vfusion3d-lightning", *command]))
            print(f"{len(points)} trials (numbers as in a new study); nothing was run")
        else:
            command = trial_command(configs, overrides, {}, out_dir / "trial-NNN_...", study_name, 0, monitor,
                                    pruner, pruner_args)
            print(shlex.join(["vfusion3d-lightning", *command]) + " --KEY=VALUE (drawn)")
            print(f"{n_trials} trials drawn by the {sampler} sampler from {json.dumps(space_.to_json())}; "
                  "nothing was run")
        return {"study": study_name, "dry_run": True}

    from tqdm import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(out_dir)
    study = open_study(storage, study_name, description, mode, out_dir)
    stale = fail_stale_trials(study, out_dir)
    if stale:
        print(f"trial(s) {', '.join(map(str, stale))} were left running by a stopped sweep: marked failed, their "
              "points run again", file=sys.stderr)
    study.sampler = _make_sampler(sampler, space_, seed + len(study.trials))
    study.pruner = make_pruner(pruner, pruner_args)

    lock = threading.Lock()  # one thread at a time talks to the study and writes the tables
    scheduler = _Scheduler(study, space_, sampler, n_trials)
    processes = _Processes()
    running: set[int] = set()  # trial ids, for the heartbeat
    stop = threading.Event()
    gpus = visible_gpus()
    failed: list[str] = []
    bar = tqdm(total=scheduler.cap, desc="sweep", unit="trial", disable=not progress)

    def refresh() -> tuple[list[dict[str, Any]], str]:
        rows = results_rows(study.get_trials(deepcopy=False), monitor, mode)
        text = write_results(rows, space_.keys, monitor, mode, out_dir)
        write_trials_file(study, description, storage, out_dir)
        if space_.variants:
            write_comparison(rows, list(space_.variants), monitor, mode, out_dir)
        return rows, text

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with lock:
                for trial_id in list(running):
                    try:
                        study._storage.set_trial_user_attr(trial_id, "heartbeat", time.time())
                    except Exception:  # finished meanwhile, or the database is away for a moment
                        pass

    def run_one(slot: int) -> bool:
        with lock:
            if stop.is_set():
                return False
            picked = scheduler.next()
            if picked is None:
                return False
            trial, params = picked
            name = space_.trial_name(trial.number, params)
            folder = out_dir / name
            command = trial_command(configs, overrides, space_.overrides_of(params), folder, study_name,
                                    trial.number, monitor, pruner, pruner_args)
            gpu = gpus[slot % len(gpus)] if gpus else None
            for key, value in {"folder": name, "host": HOST, "pid": os.getpid(), "heartbeat": time.time(),
                               "command": command, "gpu": gpu}.items():
                trial.set_user_attr(key, value)
            running.add(trial._trial_id)
        env = dict(os.environ, **{STORAGE_ENV: storage})
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        (folder / "error.txt").unlink(missing_ok=True)
        (folder / RESULT_FILE).unlink(missing_ok=True)
        try:
            code = run_trial(command, folder, timeout, env, processes)
        except BaseException:
            code = -2
            raise
        finally:
            outcome = trial_outcome(code, load_result(folder), monitor, mode, out_dir)
            if stop.is_set() and outcome.state == "FAIL":
                outcome.error = "the sweep was interrupted"
            with lock:
                running.discard(trial._trial_id)
                for key, value in (("best", outcome.best), ("run_dir", outcome.run_dir), ("error", outcome.error)):
                    if value is not None:
                        trial.set_user_attr(key, value)
                state = optuna.trial.TrialState[outcome.state]
                value = outcome.value if outcome.state == "COMPLETE" else None
                study.tell(trial.number, value, state=state, skip_if_finished=True)
                if outcome.state == "FAIL":
                    shown = shlex.join([sys.executable, "-m", "vfusion3d_lightning.cli", *command])
                    _write_text(folder / "error.txt",
                                f"{name} failed: {outcome.error}\ncommand: {shown}\nfull logs: "
                                f"{folder / 'stdout.log'}, {folder / 'stderr.log'}\n\n--- last {_STDERR_TAIL} "
                                f"lines of stderr ---\n{_tail(folder / 'stderr.log', _STDERR_TAIL)}\n")
                    failed.append(name)
                    bar.write(f"{name} failed ({outcome.error}): see {folder / 'error.txt'}")
                    if outcome.monitor_missing:
                        scheduler.stopped = True
                        bar.write(f"stopping the sweep: {outcome.error}")
                refresh()
                bar.set_postfix_str(f"{name}: {outcome.state.lower()}"
                                    + (f" {monitor}={outcome.value:.4g}" if outcome.value is not None else ""))
                bar.update(1)
        return True

    def worker(slot: int) -> None:
        while run_one(slot):
            pass

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    pool = ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="sweep")
    try:
        futures = [pool.submit(worker, slot) for slot in range(n_jobs)]
        for future in futures:
            future.result()
    except BaseException:  # Ctrl-C or an error: stop the other trials, record them failed
        stop.set()
        processes.kill_all()
        raise
    finally:
        pool.shutdown(wait=True)
        stop.set()
        beat.join()
        bar.close()
        with lock:
            rows, text = refresh()

    print(text)
    counts = {state: sum(row["status"] == state for row in rows) for state in ("COMPLETE", "PRUNED", "FAIL")}
    best = next((row for row in rows if row["status"] == "COMPLETE" and _finite(row["monitor"])), None)
    if space_.variants:
        print("\n" + (out_dir / COMPARISON_MD).read_text())
    written = [out_dir / name for name in ("results.csv", "results.md", "ranking.png")]
    written += [out_dir / name for name in (COMPARISON_CSV, COMPARISON_MD, COMPARISON_PNG, CURVES_PNG)
                if space_.variants]
    print(f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed trial(s) in study "
          f"{study_name!r} -> {', '.join(map(str, written))}"
          + (f"; {len(failed)} failed in this run (rerun the same command to retry them)" if failed else ""))
    return {"study": study_name, "storage": redact(storage), "trials": len(rows), **{k.lower(): v for k, v in
            counts.items()}, "failed_now": failed, "best": best and {"trial": best["trial"], "value": best["monitor"],
                                                                     "params": best["params"]},
            "results": str(out_dir / "results.csv")}
