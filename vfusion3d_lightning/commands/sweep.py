"""Hyperparameter sweeps over LightningCLI overrides: `vfusion3d-lightning sweep`.

    vfusion3d-lightning sweep --config configs/lrm/tiny.yaml --out outputs/sweeps/lr \\
        --grid 'model.init_args.lr=[1e-4,4e-4]' --grid 'model.init_args.lpips_weight=[0.5,1.0]' \\
        --monitor val/lpips --mode min [--set trainer.max_epochs=2 ...] [--random N --seed S]

Trials are the Cartesian product of the `--grid` values (or `--random N` distinct combinations of it). Each trial
is `vfusion3d-lightning fit --config CONFIG --KEY=VALUE ... --trainer.default_root_dir OUT/<trial>` in a fresh
Python process (no shared global state or GPU memory), with the `SweepResult` callback appended to the config's
callbacks (`--trainer.callbacks+=vfusion3d_lightning.training.callbacks.SweepResult`). `SweepResult` writes the logged
metrics after every validation and at the end to `OUT/<trial>/sweep_result.json`; the sweep reads them back.

OUT holds `trials.json` (each trial's name, overrides and command), one folder per trial (the run's
lightning_logs with checkpoints and config.yaml, stdout.log, stderr.log, error.txt when it failed), and
`results.csv` / `results.md`: one row per trial sorted by the best `--monitor` value. A rerun skips the trials
whose sweep_result.json exists and runs the failed or unfinished ones again.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vfusion3d_lightning.io import atomic_write
from vfusion3d_lightning.training.callbacks import SWEEP_RESULT_FILE as RESULT_FILE

TRIALS_FILE = "trials.json"
CALLBACK = "vfusion3d_lightning.training.callbacks.SweepResult"
RESERVED = {"trainer.default_root_dir": "the sweep sets it per trial to OUT/<trial>",
            "config": "give configs with --config"}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_NAME = 120
_STDERR_TAIL = 60  # lines of a failed trial's stderr copied into error.txt


# ---------------------------------------------------------------------------------------------- the callback


# ---------------------------------------------------------------------------------------------- parsing


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with YAML 1.2's floats: `1e-4` is a float (PyYAML alone reads it as a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _plain(value: Any) -> Any:
    """YAML values the CLI and JSON understand; other YAML types (dates) become their text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """`KEY=[v1,v2,...]` -> (KEY, values), values read as YAML scalars (1e-4 a float, true a bool, text a str).

    Raises argparse.ArgumentTypeError (argparse reports it as `argument --grid: ...`)."""
    key, sep, values = text.partition("=")
    key, values = key.strip(), values.strip()
    if not sep or not _KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KEY=[v1,v2,...] with KEY a dotted config key such as model.init_args.lr")
    if not (values.startswith("[") and values.endswith("]")):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the values must be a bracketed list, e.g. {key}=[1e-4,4e-4] (quote the argument in the "
            "shell: '...')")
    try:
        parsed = yaml.load(values, Loader=_Loader)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise argparse.ArgumentTypeError(f"{text!r}: the list is not valid YAML ({problem})") from None
    if not isinstance(parsed, list) or not parsed:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one value, e.g. {key}=[1e-4,4e-4]")
    parsed = _plain(parsed)
    seen = set()
    for value in parsed:
        if (type(value), format_value(value)) in seen:  # True and 1 are different values here
            raise argparse.ArgumentTypeError(f"{text!r}: {format_value(value)} is given twice")
        seen.add((type(value), format_value(value)))
    return key, parsed


def parse_set(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE), VALUE as given (LightningCLI parses it). `KEY+=VALUE` appends to a list
    (e.g. trainer.callbacks+=...)."""
    key, sep, value = text.partition("=")
    if not sep or not _KEY.fullmatch(key.removesuffix("+")):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KEY=VALUE with KEY a dotted config key, e.g. trainer.max_epochs=2")
    return key, value


def format_value(value: Any) -> str:
    """A value as LightningCLI reads it back: true/false/null, floats in Python's shortest form, lists as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# ---------------------------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class Trial:
    name: str
    overrides: dict[str, Any]  # grid key -> value


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


def trial_name(index: int, overrides: dict[str, Any], names: dict[str, str], width: int = 3) -> str:
    """`trial-000_lr=0.0001_lpips_weight=0.5`: safe as a folder name (other characters become `-`), at most
    ~120 characters (the index keeps truncated names unique)."""
    text = "_".join(f"{names[key]}={format_value(value)}" for key, value in overrides.items())
    text = _UNSAFE.sub("-", text).strip("-")[:_MAX_NAME]
    return f"trial-{index:0{width}d}" + (f"_{text}" if text else "")


def plan_trials(grid: list[tuple[str, list[Any]]], sets: list[tuple[str, str]] = (), random_trials: int | None = None,
                seed: int = 0) -> list[Trial]:
    """The trials of a sweep: the Cartesian product of the grid in order, or `random_trials` distinct
    combinations of it drawn with `seed` (kept in grid order)."""
    keys = [key for key, _ in grid]
    set_keys = [key for key, _ in sets]
    for key in keys + set_keys:
        if key in RESERVED:
            raise ValueError(f"{key} cannot be swept or set: {RESERVED[key]}")
    for key in set(keys):
        if keys.count(key) > 1:
            raise ValueError(f"--grid {key} is given twice; put all its values in one list")
        if key in set_keys:
            raise ValueError(f"{key} is both swept (--grid) and fixed (--set); keep one")
    for key in set(set_keys):
        if set_keys.count(key) > 1 and not key.endswith("+"):
            raise ValueError(f"--set {key} is given twice with different values; keep one")
    if not grid:
        raise ValueError("nothing to sweep: give at least one --grid KEY=[v1,v2,...]")
    values = [vals for _, vals in grid]
    total = math.prod(len(v) for v in values)
    if random_trials is None:
        combos = list(itertools.product(*values))
    else:
        if not 1 <= random_trials <= total:
            raise ValueError(f"--random {random_trials}: the grid has {total} combinations; ask for 1 to {total} "
                             "(or leave --random out to run them all)")
        indices = sorted(random.Random(seed).sample(range(total), random_trials))
        combos = [_combination(values, i) for i in indices]
    names = short_names(keys)
    width = max(3, len(str(len(combos) - 1)))
    trials = []
    for index, combo in enumerate(combos):
        overrides = dict(zip(keys, combo))
        trials.append(Trial(trial_name(index, overrides, names, width), overrides))
    return trials


def _combination(values: list[list[Any]], index: int) -> tuple:
    """The `index`-th element of itertools.product(*values), without building the product."""
    chosen = []
    for vals in reversed(values):
        index, i = divmod(index, len(vals))
        chosen.append(vals[i])
    return tuple(reversed(chosen))


def trial_command(configs: list[str], sets: list[tuple[str, str]], trial: Trial, out: Path) -> list[str]:
    """The `fit` arguments of one trial (after `python -m vfusion3d_lightning.cli`)."""
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    args += [f"--{key}={value}" for key, value in sets]
    args += [f"--{key}={format_value(value)}" for key, value in trial.overrides.items()]
    args += [f"--trainer.default_root_dir={out / trial.name}", f"--trainer.callbacks+={CALLBACK}"]
    return args


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


def run_trial(command: list[str], folder: Path, timeout: float | None = None) -> int:
    """Run `python -m vfusion3d_lightning.cli <command>` in a fresh process, stdout and stderr to
    folder/stdout.log and folder/stderr.log. Returns the exit code (-9 on timeout)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    package_root = str(Path(__file__).resolve().parents[1])  # the child imports this very package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with open(folder / "stdout.log", "wb") as stdout, open(folder / "stderr.log", "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "vfusion3d_lightning.cli", *command], stdout=stdout,
                                   stderr=stderr, env=env)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            stderr.write(f"\n[sweep] killed after the --timeout of {timeout} s\n".encode())
            return -9
        except BaseException:  # Ctrl-C: do not leave a training behind
            process.kill()
            process.wait()
            raise


def load_result(folder: Path) -> dict | None:
    """A finished trial's sweep_result.json, or None (not run, failed, or unfinished)."""
    try:
        return json.loads((folder / RESULT_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def best_entry(result: dict, monitor: str, mode: str) -> dict | None:
    """The validation (epoch, step, metrics) with the best `monitor` value; the end-of-fit metrics when no
    validation logged it; None when it was never logged."""
    entries = [e for e in result.get("history", []) if _finite(e["metrics"].get(monitor))]
    if not entries:
        final = result.get("metrics", {})
        return {"epoch": result.get("epochs"), "step": result.get("global_step"), "metrics": final} \
            if _finite(final.get(monitor)) else None
    pick = min if mode == "min" else max
    return pick(entries, key=lambda e: e["metrics"][monitor])  # the first of equal values


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- the table


def results_rows(trials: list[Trial], out: Path, monitor: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial, sorted: finished trials by their best `monitor` (mode min or max), then finished
    trials that never logged it, then failed ones; ties keep the trials' order."""
    rows = []
    for trial in trials:
        folder = out / trial.name
        result = load_result(folder)
        row = {"trial": trial.name, "overrides": trial.overrides, "status": "ok" if result else "failed",
               "monitor": None, "metrics": {}, "epoch": None, "run_dir": trial.name}
        if result:
            entry = best_entry(result, monitor, mode)
            metrics = (entry or {"metrics": result.get("metrics", {})})["metrics"]
            row.update(monitor=metrics.get(monitor) if entry else None, epoch=entry["epoch"] if entry else None,
                       metrics={k: v for k, v in metrics.items() if k.startswith("val") and k != monitor})
            if result.get("log_dir"):
                row["run_dir"] = _relative(result["log_dir"], out)
        rows.append(row)
    sign = 1 if mode == "min" else -1

    def order(row):
        if row["status"] != "ok":
            return (2, 0.0)
        return (0, sign * row["monitor"]) if _finite(row["monitor"]) else (1, 0.0)

    return sorted(rows, key=order)


def _relative(path: str, out: Path) -> str:
    try:
        return os.path.relpath(path, out)
    except ValueError:  # another drive on Windows
        return path


def _number(value: Any, digits: int | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and digits:
        return f"{value:.{digits}g}"
    return repr(value) if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]], keys: list[str], monitor: str, markdown: bool) -> tuple[list[str], list[list]]:
    """Header and cells of the results table; `markdown` uses short key names and 4 significant digits."""
    names = short_names(keys) if markdown else {key: key for key in keys}
    metrics = sorted(set().union(*(row["metrics"] for row in rows)))
    header = ["trial", *(names[key] for key in keys), monitor, *metrics, "epoch", "status", "run folder"]
    digits = 4 if markdown else None
    cells = [[row["trial"], *(format_value(row["overrides"][key]) for key in keys), _number(row["monitor"], digits),
              *(_number(row["metrics"].get(m), digits) for m in metrics), _number(row["epoch"]), row["status"],
              row["run_dir"]] for row in rows]
    return header, cells


def write_results(rows: list[dict[str, Any]], keys: list[str], monitor: str, mode: str, out: Path) -> str:
    """OUT/results.csv and OUT/results.md (atomic); returns the Markdown table."""
    header, cells = table(rows, keys, monitor, markdown=False)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(cells)
    _write_text(out / "results.csv", buffer.getvalue())
    header, cells = table(rows, keys, monitor, markdown=True)
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += [f"| {' | '.join(str(c).replace('|', '/') for c in row)} |" for row in cells]
    text = f"Sorted by {monitor} ({mode}; best value over the validations of each trial).\n\n" + "\n".join(lines)
    _write_text(out / "results.md", text + "\n")
    return text


# ---------------------------------------------------------------------------------------------- the command


def _check_trials_file(path: Path, plan: dict) -> None:
    """Refuse to mix two different sweeps in one folder (trial names would point at other overrides)."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for field in ("config", "set", "trials"):
        mine = [{k: t[k] for k in ("name", "overrides")} for t in plan[field]] if field == "trials" else plan[field]
        theirs = old.get(field)
        if field == "trials" and isinstance(theirs, list):
            theirs = [{k: t.get(k) for k in ("name", "overrides")} for t in theirs]
        if json.loads(json.dumps(mine)) != theirs:
            raise ValueError(f"{path.parent} holds another sweep ({TRIALS_FILE}: its {field} differ from these "
                             "arguments); give a new --out, or delete that folder to start over")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", required=True,
                        help="LightningCLI config of every trial; repeat to compose several, as with fit")
    parser.add_argument("--grid", action="append", type=parse_grid, default=[], metavar="KEY=[V1,V2,...]",
                        help="a swept config key and its values (YAML scalars), e.g. "
                             "'model.init_args.lr=[1e-4,4e-4]'; repeat for a grid over several keys")
    parser.add_argument("--set", action="append", type=parse_set, default=[], metavar="KEY=VALUE",
                        help="a fixed override for every trial, e.g. trainer.max_epochs=2; repeatable")
    parser.add_argument("--monitor", required=True, help="logged metric the results are sorted by, e.g. val/lpips")
    parser.add_argument("--mode", default="min", choices=["min", "max"], help="whether lower or higher is better")
    parser.add_argument("--out", required=True,
                        help="sweep folder: trials.json, results.csv/md and one run folder per trial")
    parser.add_argument("--random", type=int, default=None, metavar="N",
                        help="run N distinct combinations of the grid drawn at random instead of all of them")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which a trial is killed "
                                                                    "and recorded as failed")
    parser.add_argument("--dry-run", action="store_true", help="write trials.json and print the commands only")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    for config in args.config:
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config {config}: no such file")
    out = Path(args.out)
    trials = plan_trials(args.grid, args.set, args.random, args.seed)
    keys = [key for key, _ in args.grid]
    commands = {trial.name: trial_command(args.config, args.set, trial, out) for trial in trials}
    plan = {"config": [str(c) for c in args.config], "set": [f"{k}={v}" for k, v in args.set],
            "grid": dict(args.grid), "random": args.random, "seed": args.seed,
            "trials": [{"name": t.name, "overrides": t.overrides, "folder": str(out / t.name),
                        "command": ["vfusion3d-lightning", *commands[t.name]]} for t in trials]}
    _check_trials_file(out / TRIALS_FILE, plan)
    _write_text(out / TRIALS_FILE, json.dumps(plan, indent=2) + "\n")
    if args.dry_run:
        for trial in trials:
            print(shlex.join(["vfusion3d-lightning", *commands[trial.name]]))
        return 0

    progress = tqdm(trials, desc="sweep", unit="trial")
    for trial in progress:
        folder = out / trial.name
        if load_result(folder) is not None:
            continue  # finished in an earlier run
        progress.set_postfix_str(trial.name)
        (folder / "error.txt").unlink(missing_ok=True)
        code = run_trial(commands[trial.name], folder, args.timeout)
        if code != 0 or load_result(folder) is None:
            command = shlex.join([sys.executable, "-m", "vfusion3d_lightning.cli", *commands[trial.name]])
            report = (f"{trial.name} failed: exit code {code}"
                      + ("" if code else f" but no {RESULT_FILE} was written") + f"\ncommand: {command}\n"
                      f"full logs: {folder / 'stdout.log'}, {folder / 'stderr.log'}\n\n"
                      f"--- last {_STDERR_TAIL} lines of stderr ---\n{_tail(folder / 'stderr.log', _STDERR_TAIL)}\n")
            _write_text(folder / "error.txt", report)
            progress.write(f"{trial.name} failed (exit code {code}): see {folder / 'error.txt'}")
        write_results(results_rows(trials, out, args.monitor, args.mode), keys, args.monitor, args.mode, out)
    progress.close()

    rows = results_rows(trials, out, args.monitor, args.mode)
    text = write_results(rows, keys, args.monitor, args.mode, out)
    print(text)
    failed = sum(row["status"] != "ok" for row in rows)
    missing = [row["trial"] for row in rows if row["status"] == "ok" and row["monitor"] is None]
    if missing:
        logged = sorted(load_result(out / missing[0]).get("metrics", {}))
        print(f"warning: {len(missing)} finished trial(s) never logged {args.monitor} (logged: "
              f"{', '.join(logged) or 'nothing'}); check --monitor, and that validation runs "
              "(check_val_every_n_epoch <= max_epochs)", file=sys.stderr)
    print(f"{len(rows) - failed} of {len(rows)} trials ok -> {out / 'results.csv'}, {out / 'results.md'}"
          + (f"; {failed} failed (rerun the same command to retry them)" if failed else ""))
    return 1 if failed else 0
