"""`vfusion3d-lightning sweep` on Optuna: the search space and its checks, trial names and commands, the results
table and plot, the pruning callback, resuming (stale RUNNING trials, failed points), and a real 4-trial study of
the tiny LRM config (one `fit` subprocess per trial, two at a time) that resumes without redoing finished trials.

Most sweep-level tests stand a fake `fit` process in for subprocess.Popen (it writes sweep_result.json and talks
to the study as the trial's callbacks would), so they take a second; the real ones are marked slow."""

import csv
import inspect
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from vfusion3d_lightning.commands import sweep as sweep_module
from vfusion3d_lightning.commands.sweep import sweep
from vfusion3d_lightning.training.callbacks import OptunaPruning, SweepResult

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "lrm" / "tiny.yaml")
LR = "model.init_args.lr"
WARMUP = "model.init_args.warmup_steps"


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def load(out: Path, name: str = "sweep") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=sweep_module.default_storage(out))


# ------------------------------------------------------------------------------------ the command's signature


def test_the_signature_is_a_jsonargparse_command_and_reads_a_sweep_yaml(tmp_path):
    """Every parameter is typed and documented, and a sweep YAML parses as the CLI will read it."""
    import docstring_parser
    from jsonargparse import ActionConfigFile, ArgumentParser

    documented = {p.arg_name for p in docstring_parser.parse(sweep.__doc__).params}
    parameters = inspect.signature(sweep).parameters
    assert set(parameters) == documented
    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)  # as the CLI's command parser does
    parser.add_function_arguments(sweep, fail_untyped=True)
    (tmp_path / "lr.yaml").write_text(
        "configs: [configs/lrm/tiny.yaml]\nout: outputs/sweeps/lr\nmonitor: val/lpips\n"
        "grid: {model.init_args.lr: [1.0e-4, 4e-4]}\noverrides: {trainer.max_epochs: 2}\n"
        "space: {model.init_args.lpips_weight: {low: 1e-5, high: 1.0, log: true}}\n")
    config = parser.parse_args(["--config", str(tmp_path / "lr.yaml"), "--n_jobs", "2", "--sampler", "tpe"])
    assert config.grid == {LR: [1e-4, 4e-4]} and config.overrides == {"trainer.max_epochs": 2}
    assert config.space == {"model.init_args.lpips_weight": {"low": 1e-5, "high": 1.0, "log": True}}
    assert (config.configs, config.n_jobs, config.sampler, config.mode, config.pruner) == (
        ["configs/lrm/tiny.yaml"], 2, "tpe", "min", "none")


def test_the_module_imports_neither_lightning_nor_optuna_and_shares_the_callbacks_names():
    from vfusion3d_lightning.training import callbacks

    assert sweep_module.RESULT_FILE == callbacks.SWEEP_RESULT_FILE
    assert sweep_module.STORAGE_ENV == callbacks.SWEEP_STORAGE_ENV
    assert sweep_module.RESULT_CALLBACK == f"{SweepResult.__module__}.{SweepResult.__name__}"
    assert sweep_module.PRUNING_CALLBACK == f"{OptunaPruning.__module__}.{OptunaPruning.__name__}"
    probe = ("import sys, vfusion3d_lightning.commands.sweep; "
             "print('lightning' in sys.modules, 'optuna' in sys.modules, 'matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.split() == ["False", "False", "False"]


# ------------------------------------------------------------------------------------ the search space


def test_grid_and_space_are_checked_and_filled_in():
    space = sweep_module.search_space(
        "tpe", {LR: [1e-4, 4e-4], "trainer.precision": [32, "bf16-mixed"], "a.b": [[1, 2], True, 1]},
        {"m.w": {"low": "1e-5", "high": 1, "log": True}, "m.n": {"low": 1, "high": 8, "step": 2},
         "m.c": {"choices": ["x", None]}, "m.f": {"low": 0, "high": 1, "type": "float"}}, {"trainer.max_epochs": 2},
        n_trials=3)
    assert space.grid == {LR: [1e-4, 4e-4], "trainer.precision": [32, "bf16-mixed"], "a.b": ["[1,2]", True, 1]}
    assert space.space == {"m.w": {"type": "float", "low": 1e-5, "high": 1.0, "log": True, "step": None},
                           "m.n": {"type": "int", "low": 1, "high": 8, "log": False, "step": 2},
                           "m.c": {"type": "categorical", "choices": ["x", None]},
                           "m.f": {"type": "float", "low": 0.0, "high": 1.0, "log": False, "step": None}}
    assert space.keys == [LR, "trainer.precision", "a.b", "m.w", "m.n", "m.c", "m.f"]
    samples = space.samples()  # every grid value and both ends of each range
    assert [s[LR] for s in samples] == [1e-4, 4e-4, 1e-4] and [s["m.w"] for s in samples] == [1e-5, 1.0, 1e-5]
    grid = sweep_module.search_space("grid", {LR: [1, 2], WARMUP: [3, 4]}, None, None, None)
    assert grid.points() == [{LR: 1, WARMUP: 3}, {LR: 1, WARMUP: 4}, {LR: 2, WARMUP: 3}, {LR: 2, WARMUP: 4}]


@pytest.mark.parametrize("sampler, grid, space, overrides, n_trials, says", [
    ("grid", None, None, None, None, "nothing to sweep"),
    ("grid", {"a": [1]}, {"b": {"low": 0, "high": 1}}, None, None, "space needs sampler random or tpe"),
    ("random", {"a": [1]}, None, None, None, "the random sampler needs n_trials"),
    ("tpe", None, None, None, 3, "nothing to sweep"),
    ("random", {"a": [1]}, {"a": {"low": 0, "high": 1}}, None, 2, "a is both in grid and in space"),
    ("grid", {"a": [1]}, None, {"a": 2}, None, "a is both swept and fixed"),
    ("grid", {"trainer.default_root_dir": ["x"]}, None, None, None, "sets it per trial"),
    ("grid", {"a": []}, None, None, None, "non-empty list"),
    ("grid", {"a": [1e-4, 0.0001]}, None, None, None, "0.0001 is given twice"),
    ("grid", {"model lr": [1]}, None, None, None, "not a dotted config key"),
    ("random", None, {"a": {"low": 1}}, None, 2, "give low and high"),
    ("random", None, {"a": {"low": 0, "high": 1, "log": True}}, None, 2, "low > 0"),
    ("random", None, {"a": {"low": 2, "high": 1}}, None, 2, "above high"),
    ("random", None, {"a": {"low": 0, "high": 1, "scale": 2}}, None, 2, "unknown field"),
    ("random", None, {"a": {"low": "x", "high": 1}}, None, 2, "low must be a number"),
    ("grid", {"a": [1]}, None, None, 0, "n_trials must be at least 1"),
])
def test_malformed_or_conflicting_arguments_are_refused(sampler, grid, space, overrides, n_trials, says):
    with pytest.raises(ValueError, match=says):
        sweep_module.search_space(sampler, grid, space, overrides, n_trials)


def test_trial_names_and_commands():
    names = sweep_module.short_names([LR, "model.init_args.lpips_weight"])
    assert sweep_module.trial_name(7, {LR: 1e-4, "model.init_args.lpips_weight": 0.5}, names) == \
        "trial-007_lr=0.0001_lpips_weight=0.5"
    assert sweep_module.trial_name(3, {LR: 0.000123456789}, {LR: "lr"}) == "trial-003_lr=0.0001235"
    assert sweep_module.short_names(["model.init_args.lr", "data.init_args.lr"]) == {
        "model.init_args.lr": "model.lr", "data.init_args.lr": "data.lr"}
    odd = sweep_module.trial_name(1234, {"n": "network/tiny v2.yaml", "f": True, "x": "x" * 300},
                                  {"n": "n", "f": "f", "x": "x"})
    assert odd.startswith("trial-1234_n=network-tiny-v2.yaml_f=true_x=xxx") and len(odd) <= 131

    command = sweep_module.trial_command(["a.yaml", "b.yaml"], {"trainer.max_epochs": 2, "data.init_args.p": "s*.tar"},
                                         {LR: 1e-05, "a.b": "[1,2]", "c.d": None}, Path("out") / "t", "lr", 3,
                                         "val/lpips", "median", {"n_startup_trials": 1})
    assert command[:13] == ["fit", "--config", "a.yaml", "--config", "b.yaml", "--trainer.max_epochs=2",
                            "--data.init_args.p=s*.tar", "--model.init_args.lr=1e-05", "--a.b=[1,2]", "--c.d=null",
                            f"--trainer.default_root_dir={Path('out') / 't'}",
                            "--trainer.callbacks+=vfusion3d_lightning.training.callbacks.SweepResult",
                            command[12]]
    pruning = json.loads(command[12].removeprefix("--trainer.callbacks+="))
    assert pruning == {"class_path": "vfusion3d_lightning.training.callbacks.OptunaPruning",
                       "init_args": {"study_name": "lr", "trial_number": 3, "monitor": "val/lpips",
                                     "pruner": "median", "pruner_args": {"n_startup_trials": 1}}}
    assert len(command) == 13  # the storage URL (maybe with a password) goes by environment, not argv


def test_storage_urls_are_redacted():
    assert sweep_module.redact("postgresql://me:secret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert sweep_module.redact("sqlite:////a/b.db") == "sqlite:////a/b.db"


# ------------------------------------------------------------------------------------ checks before any trial


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a trial was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("where, key, says", [
    ("grid", "model.init_args.lrr", "'model.init_args.lrr' is not a key of the config .*did you mean "
                                    "model.init_args.lr\\?"),
    ("overrides", "trainer.max_epoch", "overrides: 'trainer.max_epoch' .*did you mean trainer.max_epochs"),
    ("grid", "modle.init_args.lr", "did you mean model.init_args.lr"),
])
def test_a_misspelt_key_fails_before_any_trial_runs(tmp_path, no_training, where, key, says):
    out = tmp_path / "sweep"
    kwargs = {"grid": {LR: [1e-4, 4e-4]}, "overrides": {}}
    kwargs[where] = {key: [1, 2]} if where == "grid" else {key: 1}
    with pytest.raises(ValueError, match=says):
        sweep([TINY], str(out), "val/lpips", **kwargs)
    assert not out.exists()  # no study, no folder


def test_a_value_lightning_rejects_fails_before_any_trial_runs(tmp_path, no_training):
    with pytest.raises(ValueError, match="LightningCLI rejects the values .*abc(.|\n)*Expected a <class 'float'>"):
        sweep([TINY], str(tmp_path / "sweep"), "val/lpips", grid={LR: [1e-4, "abc"]})
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        sweep([str(tmp_path / "missing.yaml")], str(tmp_path / "sweep"), "val/lpips", grid={LR: [1e-4]})
    assert not (tmp_path / "sweep").exists()


def test_dry_run_prints_the_commands_and_creates_nothing(tmp_path, capsys, no_training):
    out = tmp_path / "sweep"
    result = sweep([TINY], str(out), "val/lpips", grid={LR: [1e-4, 4e-4], WARMUP: [1, 2]},
                   overrides={"trainer.max_epochs": 2}, dry_run=True, n_trials=3)
    printed = capsys.readouterr().out.splitlines()
    assert result["dry_run"] and len(printed) == 4 and printed[-1].startswith("3 trials")
    assert printed[2].startswith("vfusion3d-lightning fit --config") and "--model.init_args.lr=0.0004" in printed[2]
    assert "--trainer.max_epochs=2" in printed[0] and "trial-000_lr=0.0001_warmup_steps=1" in printed[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------ the results table, plot


def _frozen(number: int, state: TrialState, value: float | None, params: dict, metrics: dict | None = None):
    attrs = {"folder": f"trial-{number:03d}", "run_dir": f"trial-{number:03d}/lightning_logs/version_0"}
    if value is not None:
        attrs["best"] = {"value": value, "epoch": number, "step": 2 * number, "metrics": metrics or {}}
    trial = optuna.trial.create_trial(
        state=state, value=value if state == TrialState.COMPLETE else None, params=params,
        distributions={k: optuna.distributions.CategoricalDistribution([0.1, 0.2, 0.3, 0.4, 0.5]) for k in params},
        user_attrs=attrs)
    trial.number = number
    return trial


@pytest.mark.parametrize("mode, order", [("min", [1, 0, 4, 2, 3]), ("max", [0, 1, 2, 4, 3])])
def test_results_are_ranked_by_the_best_monitor_value(tmp_path, mode, order):
    trials = [_frozen(0, TrialState.COMPLETE, 0.3, {"x": 0.1}, {"val/p": 2.0}),
              _frozen(1, TrialState.COMPLETE, 0.1, {"x": 0.2}, {"val/p": 3.0}),
              _frozen(2, TrialState.PRUNED, 0.9, {"x": 0.3}),
              _frozen(3, TrialState.FAIL, None, {"x": 0.4}),
              _frozen(4, TrialState.PRUNED, 0.2, {"x": 0.5})]
    rows = sweep_module.results_rows(trials, "val/l", mode)
    assert [r["number"] for r in rows] == order
    assert [r["status"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED", "FAIL"]
    text = sweep_module.write_results(rows, ["x"], "val/l", mode, tmp_path)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| trial | x | val/l | val/p | epoch | status | run folder |"
    assert [line.split(" | ")[0] for line in table[1:]] == [f"| trial-{n:03d}" for n in order]
    written = csv_rows(tmp_path / "results.csv")
    assert [r["trial"] for r in written] == [f"trial-{n:03d}" for n in order]
    assert written[0]["run folder"] == f"trial-{order[0]:03d}/lightning_logs/version_0"
    assert written[-1]["val/l"] == "" and written[-1]["status"] == "FAIL"
    assert (tmp_path / "results.md").read_text().startswith("Ranked by val/l")
    assert (tmp_path / "ranking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_trials_outcome_comes_from_its_exit_code_and_result_file(tmp_path):
    history = [{"epoch": 0, "step": 1, "metrics": {"val/l": 0.5, "val/p": 1.0}},
               {"epoch": 1, "step": 2, "metrics": {"val/l": 0.3, "val/p": 2.0}}]
    result = {"history": history, "metrics": {}, "log_dir": str(tmp_path / "t" / "lightning_logs" / "version_0")}
    done = sweep_module.trial_outcome(0, result, "val/l", "min", tmp_path)
    assert (done.state, done.value, done.best["epoch"], done.best["metrics"], done.run_dir) == (
        "COMPLETE", 0.3, 1, {"val/p": 2.0}, os.path.join("t", "lightning_logs", "version_0"))
    assert sweep_module.trial_outcome(0, result, "val/l", "max", tmp_path).value == 0.5
    pruned = sweep_module.trial_outcome(0, {**result, "pruned": {"epoch": 1}}, "val/l", "min", tmp_path)
    assert (pruned.state, pruned.value) == ("PRUNED", 0.3)
    assert sweep_module.trial_outcome(2, None, "val/l", "min", tmp_path).error == "exit code 2"
    assert "no sweep_result.json" in sweep_module.trial_outcome(0, None, "val/l", "min", tmp_path).error
    assert sweep_module.trial_outcome(-9, None, "val/l", "min", tmp_path).error == "killed after the timeout"
    nan = {"history": [{"epoch": 0, "step": 1, "metrics": {"val/l": float("nan")}}], "metrics": {}}
    diverged = sweep_module.trial_outcome(0, nan, "val/l", "min", tmp_path)
    assert diverged.state == "FAIL" and "never a finite number" in diverged.error and not diverged.monitor_missing
    missing = sweep_module.trial_outcome(0, result, "val/lpips", "min", tmp_path)
    assert missing.state == "FAIL" and missing.monitor_missing and "logged: val/l, val/p" in missing.error


# ------------------------------------------------------------------------------------ the pruning callback


def _fake_trainer(value: float | None, epoch: int, root: Path | None = None, callbacks=()):
    metrics = {} if value is None else {"val/l": value, "val/p": 1.0}
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, callback_metrics=metrics,
                              current_epoch=epoch, global_step=10 * (epoch + 1), should_stop=False,
                              strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), interrupted=False,
                              checkpoint_callback=None, logger=None, default_root_dir=str(root),
                              callbacks=list(callbacks))
    return trainer


def _study_with_a_finished_trial(tmp_path: Path, values: list[float]) -> tuple[str, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="minimize")
    done = study.ask()
    for epoch, value in enumerate(values):
        done.report(value, epoch)
    study.tell(done, values[-1])
    return url, study


def test_the_pruning_callback_stops_a_trial_worse_than_the_median(tmp_path, monkeypatch):
    url, study = _study_with_a_finished_trial(tmp_path, [0.5, 0.4, 0.3])
    good, bad = study.ask(), study.ask()
    monkeypatch.setenv(sweep_module.STORAGE_ENV, url)  # as the sweep gives it to a trial
    args = {"study_name": "s", "monitor": "val/l", "pruner": "median", "pruner_args": {"n_startup_trials": 1}}
    keep, prune = OptunaPruning(trial_number=good.number, **args), OptunaPruning(trial_number=bad.number, **args)
    for epoch, (better, worse) in enumerate([(0.45, 0.9), (0.35, 0.8)]):
        trainer = _fake_trainer(better, epoch)
        keep.on_validation_end(trainer, None)
        assert not trainer.should_stop and keep.pruned is None
        trainer = _fake_trainer(worse, epoch)
        prune.on_validation_end(trainer, None)
        assert trainer.should_stop  # worse than the finished trial at epoch 0: stopped at once
        if epoch == 0:
            assert prune.pruned == {"epoch": 0, "step": 10, "value": 0.9}
            break
    values = {t.number: t.intermediate_values for t in study.get_trials()}
    assert values[good.number] == {0: 0.45} and values[bad.number] == {0: 0.9}
    # SweepResult records it, so the sweep tells the trial PRUNED
    trainer = _fake_trainer(0.9, 0, tmp_path / "run", callbacks=[prune])
    result = SweepResult()
    result.on_validation_end(trainer, None)
    result.on_fit_end(trainer, None)
    written = json.loads((tmp_path / "run" / sweep_module.RESULT_FILE).read_text())
    assert written["pruned"] == {"epoch": 0, "step": 10, "value": 0.9}
    assert sweep_module.trial_outcome(0, written, "val/l", "min", tmp_path).state == "PRUNED"


def test_the_pruning_callback_without_a_study_or_monitor_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(sweep_module.STORAGE_ENV, raising=False)
    callback = OptunaPruning("s", 0, "val/l", pruner="median")  # a trial's config.yaml rerun by hand
    trainer = _fake_trainer(0.9, 0)
    callback.on_validation_end(trainer, None)
    assert not trainer.should_stop and callback.pruned is None
    url, study = _study_with_a_finished_trial(tmp_path, [0.5])
    trial = study.ask()
    callback = OptunaPruning("s", trial.number, "val/l", storage=url, pruner="median",
                             pruner_args={"n_startup_trials": 1})
    callback.on_validation_end(_fake_trainer(None, 0), None)  # val/l not logged: nothing reported
    assert study.get_trials()[trial.number].intermediate_values == {}
    with pytest.raises(ValueError, match="pruner median: .*bogus"):
        OptunaPruning("s", 0, "val/l", pruner="median", pruner_args={"bogus": 1})


# ------------------------------------------------------------------------------------ sweeps with a fake `fit`


class FakeFit:
    """Stands in for subprocess.Popen of a trial: reads the trial's params and callbacks from the command, then
    in wait() does what the trial's `fit` would: reports each epoch's `val/l` to the study through
    OptunaPruning (stopping when pruned) and writes sweep_result.json; or fails. `behaviour(params)` gives the
    per-epoch values, or an int exit code."""

    launched: list[list[str]] = []
    envs: list[dict[str, str]] = []
    behaviour = staticmethod(lambda params: [params.get(LR, 0.1) * (3 - epoch) for epoch in range(2)])

    def __init__(self, command, stdout=None, stderr=None, env=None):
        FakeFit.launched.append(command)
        FakeFit.envs.append(env)
        self.command, self.stderr, self.env = command, stderr, env
        words = dict(word[2:].split("=", 1) for word in command if word.startswith("--") and "=" in word)
        self.folder = Path(words["trainer.default_root_dir"])
        self.params = {key: yaml.safe_load(value) for key, value in words.items() if key.startswith("model.")}
        pruning = json.loads([w for w in command if "OptunaPruning" in w][0].split("=", 1)[1])
        self.pruning = OptunaPruning(storage=env[sweep_module.STORAGE_ENV], **pruning["init_args"])

    def wait(self, timeout=None):
        values = FakeFit.behaviour(self.params)
        if isinstance(values, int):
            self.stderr.write(b"Traceback (most recent call last):\nValueError: the fake trial broke\n")
            return values
        history = []
        for epoch, value in enumerate(values):
            history.append({"epoch": epoch, "step": epoch + 1, "metrics": {"val/l": value, "val/p": 2 * value}})
            if self.pruning.check(epoch, epoch + 1, value):
                break
        result = {"metrics": history[-1]["metrics"], "history": history, "log_dir": str(self.folder / "logs"),
                  "pruned": self.pruning.pruned}
        (self.folder / sweep_module.RESULT_FILE).write_text(json.dumps(result))
        return 0

    def poll(self):
        return 0

    def kill(self):
        pass


@pytest.fixture
def fake_fit(monkeypatch):
    FakeFit.launched, FakeFit.envs = [], []
    monkeypatch.setattr(subprocess, "Popen", FakeFit)
    monkeypatch.setattr(FakeFit, "behaviour", staticmethod(FakeFit.behaviour))
    return FakeFit


def _lrs(launched: list[list[str]]) -> list[float]:
    return [float(word.split("=")[1]) for command in launched for word in command if word.startswith(f"--{LR}=")]


GRID = {LR: [0.4, 0.3, 0.2, 0.1]}


def test_a_failing_trial_is_recorded_and_the_rerun_retries_only_it(tmp_path, fake_fit):
    out = tmp_path / "sweep"
    fake_fit.behaviour = staticmethod(lambda params: 2 if params[LR] == 0.3 else [params[LR]])
    result = sweep([TINY], str(out), "val/l", grid=GRID, progress=False)
    assert result["failed_now"] == ["trial-001_lr=0.3"] and (result["complete"], result["fail"]) == (3, 1)
    bad = out / "trial-001_lr=0.3"
    error = (bad / "error.txt").read_text()
    assert error.startswith("trial-001_lr=0.3 failed: exit code 2")
    assert "--model.init_args.lr=0.3" in error and "ValueError: the fake trial broke" in error  # stderr's tail
    rows = csv_rows(out / "results.csv")
    assert [(r["trial"], r["status"]) for r in rows] == [
        ("trial-003_lr=0.1", "COMPLETE"), ("trial-002_lr=0.2", "COMPLETE"), ("trial-000_lr=0.4", "COMPLETE"),
        (bad.name, "FAIL")]
    assert list(rows[0]) == ["trial", LR, "val/l", "val/p", "epoch", "status", "run folder"]
    plan = json.loads((out / "trials.json").read_text())
    assert [(t["name"], t["state"]) for t in plan["trials"]][1] == (bad.name, "FAIL")
    assert plan["trials"][1]["error"] == "exit code 2" and plan["grid"] == GRID

    fake_fit.launched = []
    fake_fit.behaviour = staticmethod(lambda params: [params[LR]])
    result = sweep([TINY], str(out), "val/l", grid=GRID, progress=False)
    assert _lrs(fake_fit.launched) == [0.3] and not result["failed_now"]
    rows = csv_rows(out / "results.csv")
    assert [(r["trial"], r["status"]) for r in rows][:2] == [("trial-003_lr=0.1", "COMPLETE"),
                                                             ("trial-002_lr=0.2", "COMPLETE")]
    assert ("trial-004_lr=0.3", "COMPLETE") in [(r["trial"], r["status"]) for r in rows]
    assert rows[-1]["trial"] == bad.name and rows[-1]["status"] == "FAIL"  # the history stays

    fake_fit.launched = []
    sweep([TINY], str(out), "val/l", grid=GRID, progress=False)  # everything done: nothing runs
    assert fake_fit.launched == []


def test_a_killed_sweeps_running_trial_is_failed_and_its_point_rerun(tmp_path, fake_fit):
    out = tmp_path / "sweep"
    sweep([TINY], str(out), "val/l", grid=GRID, n_trials=2, progress=False)
    assert _lrs(fake_fit.launched) == [0.4, 0.3]
    done = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{sweep_module.RESULT_FILE}")}
    assert len(done) == 2
    # a sweep killed while it ran 0.2: its trial stays RUNNING, its process (pid) is gone
    study = load(out)
    study.enqueue_trial({LR: 0.2})
    killed = study.ask()
    killed.suggest_categorical(LR, GRID[LR])
    dead = 2**30  # above any pid_max: no such process
    for key, value in {"folder": "trial-002_lr=0.2", "host": sweep_module.HOST, "pid": dead,
                       "heartbeat": time.time()}.items():
        killed.set_user_attr(key, value)
    (out / "trial-002_lr=0.2").mkdir()
    # and a trial another machine runs now (fresh heartbeat): left alone
    other = optuna.trial.create_trial(state=TrialState.RUNNING, params={}, distributions={},
                                      user_attrs={"host": "elsewhere", "pid": 1, "heartbeat": time.time()})
    study.add_trial(other)

    fake_fit.launched = []
    sweep([TINY], str(out), "val/l", grid=GRID, progress=False)
    assert sorted(_lrs(fake_fit.launched)) == [0.1, 0.2]  # not the finished 0.4 and 0.3
    assert {p: p.stat().st_mtime_ns for p in done} == done
    trials = load(out).get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    assert [t.state for t in trials if t.user_attrs.get("host") == "elsewhere"] == [TrialState.RUNNING]
    assert "stopped (killed?)" in (out / "trial-002_lr=0.2" / "error.txt").read_text()
    rows = csv_rows(out / "results.csv")
    assert [r["status"] for r in rows] == ["COMPLETE"] * 4 + ["FAIL"]
    assert [float(r[LR]) for r in rows[:4]] == [0.1, 0.2, 0.3, 0.4]


def test_stale_running_trials(tmp_path):
    now = time.time()
    trial = SimpleNamespace(user_attrs={"host": "elsewhere", "pid": 1, "heartbeat": now - 10})
    assert not sweep_module.is_stale(trial, now)
    trial.user_attrs["heartbeat"] = now - sweep_module.STALE_AFTER_S - 1
    assert sweep_module.is_stale(trial, now)  # another host's sweep fell silent
    assert sweep_module.is_stale(SimpleNamespace(user_attrs={}), now)  # not started by a sweep
    here = SimpleNamespace(user_attrs={"host": sweep_module.HOST, "pid": os.getppid(), "heartbeat": now})
    assert not sweep_module.is_stale(here, now)  # a live sweep on this host
    here.user_attrs["pid"] = os.getpid()
    assert sweep_module.is_stale(here, now)


def test_a_changed_search_space_needs_a_new_out(tmp_path, fake_fit):
    out = tmp_path / "sweep"
    sweep([TINY], str(out), "val/l", grid={LR: [0.1, 0.2]}, progress=False)
    for change in ({"grid": {LR: [0.1, 0.3]}}, {"overrides": {"trainer.max_epochs": 3}}, {"mode": "max"},
                   {"sampler": "random", "n_trials": 2}):
        kwargs = {"grid": {LR: [0.1, 0.2]}, **change}
        with pytest.raises(ValueError, match="holds a sweep with another search space.*give a new out"):
            sweep([TINY], str(out), "val/l", progress=False, **kwargs)
    assert len(fake_fit.launched) == 2


def test_the_median_pruner_prunes_through_the_sweep(tmp_path, fake_fit):
    """Trials report to the study as they train; the worse half is pruned, ranked after the complete ones."""
    out = tmp_path / "sweep"
    fake_fit.behaviour = staticmethod(lambda params: [params[LR] * (3 - epoch) for epoch in range(3)])
    result = sweep([TINY], str(out), "val/l", grid={LR: [0.1, 0.2, 0.05, 0.4]}, pruner="median",
                   pruner_args={"n_startup_trials": 1}, progress=False)
    assert (result["complete"], result["pruned"]) == (2, 2)
    states = {t.params[LR]: (t.state, len(t.intermediate_values)) for t in load(out).get_trials()}
    assert states == {0.1: (TrialState.COMPLETE, 3), 0.2: (TrialState.PRUNED, 1), 0.05: (TrialState.COMPLETE, 3),
                      0.4: (TrialState.PRUNED, 1)}
    rows = csv_rows(out / "results.csv")
    assert [(float(r[LR]), r["status"]) for r in rows] == [(0.05, "COMPLETE"), (0.1, "COMPLETE"),
                                                          (0.2, "PRUNED"), (0.4, "PRUNED")]
    assert float(rows[0]["val/l"]) == pytest.approx(0.05) and float(rows[2]["val/l"]) == pytest.approx(0.6)
    assert result["best"] == {"trial": "trial-002_lr=0.05", "value": pytest.approx(0.05), "params": {LR: 0.05}}


def test_random_and_tpe_draw_from_the_space_and_resume_to_n_trials(tmp_path, fake_fit):
    out = tmp_path / "sweep"
    space = {LR: {"low": 1e-5, "high": 1e-2, "log": True}}
    grid = {WARMUP: [1, 2]}
    result = sweep([TINY], str(out), "val/l", sampler="tpe", grid=grid, space=space, n_trials=3, seed=1,
                   progress=False)
    assert result["complete"] == 3 and len(fake_fit.launched) == 3
    lrs = _lrs(fake_fit.launched)
    assert len(set(lrs)) == 3 and all(1e-5 <= lr <= 1e-2 for lr in lrs)
    assert {json.loads(w.split("=")[1]) for c in fake_fit.launched for w in c if w.startswith(f"--{WARMUP}=")} <= {1, 2}
    fake_fit.launched = []
    sweep([TINY], str(out), "val/l", sampler="tpe", grid=grid, space=space, n_trials=5, seed=1, progress=False)
    assert len(fake_fit.launched) == 2 and not set(_lrs(fake_fit.launched)) & set(lrs)  # new draws
    assert len(csv_rows(out / "results.csv")) == 5


def test_trials_run_in_parallel_one_gpu_each_and_a_missing_monitor_stops_the_sweep(tmp_path, fake_fit,
                                                                                   monkeypatch):
    monkeypatch.setattr(sweep_module, "visible_gpus", lambda: ["3", "5"])
    out = tmp_path / "sweep"
    sweep([TINY], str(out), "val/l", grid=GRID, n_jobs=2, progress=False)
    assert sorted(_lrs(fake_fit.launched)) == sorted(GRID[LR])
    assert {env["CUDA_VISIBLE_DEVICES"] for env in fake_fit.envs} == {"3", "5"}
    assert {env[sweep_module.STORAGE_ENV] for env in fake_fit.envs} == {sweep_module.default_storage(out)}

    fake_fit.launched = []
    result = sweep([TINY], str(tmp_path / "other"), "val/lpips", grid=GRID, progress=False)  # never logged
    assert len(fake_fit.launched) == 1 and result["failed_now"] == ["trial-000_lr=0.4"]
    error = (tmp_path / "other" / "trial-000_lr=0.4" / "error.txt").read_text()
    assert "never logged val/lpips (logged: val/l, val/p)" in error


# ------------------------------------------------------------------------------------ end to end, real `fit`


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 procedural objects as 32-px `random32` renders (what tests/modules' render_procedural_shards does)."""
    from vfusion3d_lightning.data.procedural import write_assets
    from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder

    root = tmp_path_factory.mktemp("sweep_data")
    write_assets(root / "assets", 2, seed=5, progress=False)
    render_folder(root / "assets", root / "random32", RenderSettings(views="random32", resolution=32), workers=1,
                  shard_size=2, progress=False)
    return str(root / "random32" / "shard-*.tar")


def fast(shards: str) -> dict:
    """Overrides that make a tiny LRM trial two epochs of one step, each validated, on CPU."""
    return {"trainer.max_epochs": 2, "trainer.check_val_every_n_epoch": 1, "trainer.num_sanity_val_steps": 0,
            "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
            "data.init_args.train_shards": shards, "data.init_args.val_shards": shards,
            "data.init_args.num_workers": 0, "data.init_args.samples_per_epoch": 2, "data.init_args.val_samples": 2,
            "data.init_args.num_supervision_views": 2, "model.init_args.lpips_weight": 0.0,
            "model.init_args.turntable_frames": 2}


@pytest.mark.slow
def test_a_real_four_trial_study_runs_two_at_a_time_and_resumes(tmp_path, shards, monkeypatch):
    out = tmp_path / "sweep"
    grid = {LR: [1e-5, 1e-2], WARMUP: [1, 4]}
    kwargs = {"grid": grid, "overrides": fast(shards), "n_jobs": 2, "progress": False}
    # killed after two trials: as a run of n_trials=2
    first = sweep([TINY], str(out), "val/lpips", n_trials=2, **kwargs)
    assert first["complete"] == 2 and not first["failed_now"]
    finished = {p: p.stat().st_mtime_ns for p in out.glob(f"*/{sweep_module.RESULT_FILE}")}
    assert sorted(p.parent.name for p in finished) == ["trial-000_lr=1e-05_warmup_steps=1",
                                                       "trial-001_lr=1e-05_warmup_steps=4"]
    result = sweep([TINY], str(out), "val/lpips", **kwargs)
    assert result["complete"] == 4 and not result["failed_now"]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not run again

    rows = csv_rows(out / "results.csv")
    assert len(rows) == 4 and all(r["status"] == "COMPLETE" for r in rows)
    assert list(rows[0]) == ["trial", LR, WARMUP, "val/lpips", "val/psnr", "val/ssim", "epoch", "status",
                             "run folder"]
    values = [float(r["val/lpips"]) for r in rows]
    assert values == sorted(values)
    assert sorted((float(r[LR]), int(r[WARMUP])) for r in rows) == [(1e-5, 1), (1e-5, 4), (1e-2, 1), (1e-2, 4)]
    study = load(out)
    for row in rows:
        folder = out / row["trial"]
        result_file = json.loads((folder / sweep_module.RESULT_FILE).read_text())
        best = min(h["metrics"]["val/lpips"] for h in result_file["history"])
        assert [h["epoch"] for h in result_file["history"]] == [0, 1] and float(row["val/lpips"]) == best
        config = yaml.safe_load((out / row["run folder"] / "config.yaml").read_text())
        assert config["model"]["init_args"]["lr"] == float(row[LR])
        assert config["trainer"]["default_root_dir"] == str(folder)
        callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
        assert callbacks[-2:] == [sweep_module.RESULT_CALLBACK, sweep_module.PRUNING_CALLBACK]
        assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks  # the config's own callbacks kept
        assert config["trainer"]["callbacks"][-1]["init_args"]["storage"] is None  # no URL in config.yaml
        trial = study.trials[int(row["trial"][6:9])]
        assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(best)
        assert set(trial.intermediate_values) == {0, 1}  # the callback reported each validation
    assert (out / "ranking.png").stat().st_size > 0 and (out / "results.md").is_file()

    # a third run has nothing left to do
    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished trial was run again: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_training)
    table = (out / "results.csv").read_bytes()
    assert sweep([TINY], str(out), "val/lpips", **kwargs)["complete"] == 4
    assert (out / "results.csv").read_bytes() == table


# ------------------------------------------------------------------------------------ variants (ablations)


VARIANTS = {"base": {}, "low": {LR: 0.1}, "high": {LR: 0.3}}


def test_variants_run_one_named_trial_each_and_compare_with_the_first(tmp_path, fake_fit):
    from PIL import Image

    out = tmp_path / "sweep"
    fake_fit.behaviour = staticmethod(lambda params: 2 if params[LR] == 0.3 else [params[LR] * (3 - e) for e in
                                                                                 range(2)])
    result = sweep([TINY], str(out), "val/l", variants=VARIANTS, overrides={LR: 0.2}, progress=False)
    assert (result["complete"], result["failed_now"]) == (2, ["trial-002_high"])
    # the base variant gets the overrides alone; another variant's value of a key comes after them (and wins)
    assert [_lrs([c]) for c in fake_fit.launched] == [[0.2], [0.2, 0.1], [0.2, 0.3]]
    assert [c[c.index(f"--{LR}=0.2") + 1].startswith("--trainer.default_root_dir=") for c in fake_fit.launched] == [
        True, False, False]
    rows = csv_rows(out / "results.csv")
    assert [(r["trial"], r["variant"], r["status"]) for r in rows] == [("trial-001_low", "low", "COMPLETE"), (
        "trial-000_base", "base", "COMPLETE"), ("trial-002_high", "high", "FAIL")]
    comparison = csv_rows(out / "comparison.csv")
    assert list(comparison[0]) == ["variant", "status", "step", "val/l", "Δ val/l", "val/p", "Δ val/p"]
    assert [(r["variant"], r["status"], r["step"]) for r in comparison] == [
        ("base", "COMPLETE", "2"), ("low", "COMPLETE", "2"), ("high", "FAIL", "")]
    # the last validation (epoch 1: 2 x lr), not the best, and minus the first variant's
    assert [float(comparison[i]["val/l"]) for i in (0, 1)] == pytest.approx([0.4, 0.2])
    assert [float(comparison[i]["Δ val/l"]) for i in (0, 1)] == pytest.approx([0.0, -0.2])
    assert float(comparison[1]["Δ val/p"]) == pytest.approx(-0.4) and comparison[2]["val/l"] == ""
    markdown = (out / "comparison.md").read_text()
    assert "`base` (the first variant)" in markdown and "| low | COMPLETE | 2 | 0.2 | -0.2 | 0.4 | -0.4 |" in markdown
    for name in ("comparison.png", "curves.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200

    fake_fit.launched = []
    fake_fit.behaviour = staticmethod(lambda params: [params[LR] * (3 - e) for e in range(3)])
    result = sweep([TINY], str(out), "val/l", variants=VARIANTS, overrides={LR: 0.2}, progress=False)
    assert [_lrs([c]) for c in fake_fit.launched] == [[0.2, 0.3]] and result["complete"] == 3  # only the failed one
    comparison = csv_rows(out / "comparison.csv")
    assert [(r["variant"], r["status"], r["step"]) for r in comparison][2] == ("high", "COMPLETE", "3")
    assert float(comparison[2]["Δ val/l"]) == pytest.approx(0.3 - 0.4)
    fake_fit.launched = []
    sweep([TINY], str(out), "val/l", variants=VARIANTS, overrides={LR: 0.2}, progress=False)
    assert fake_fit.launched == []  # every variant done
    with pytest.raises(ValueError, match="another search space.*variants"):
        sweep([TINY], str(out), "val/l", variants={**VARIANTS, "high": {LR: 0.4}}, overrides={LR: 0.2},
              progress=False)


@pytest.mark.parametrize("kwargs, says", [
    ({"grid": {LR: [1]}}, "variants replace grid and space"),
    ({"sampler": "random", "n_trials": 2}, "drop sampler random"),
    ({"variants": {}}, "give a mapping of names to overrides"),
    ({"variants": {"no opacity": {}}}, "'no opacity' is not a usable name"),
    ({"variants": {"a": [1]}}, "variants a: expected a mapping"),
    ({"variants": {"a": {"trainer.default_root_dir": "x"}}}, "variants a: trainer.default_root_dir cannot be set"),
    ({"variants": {"a": {"model lr": 1}}}, "not a dotted config key"),
])
def test_malformed_variants_are_refused(kwargs, says):
    kwargs = {"grid": None, "space": None, "overrides": None, "n_trials": None, "sampler": "grid",
              "variants": VARIANTS, **kwargs}
    with pytest.raises(ValueError, match=says):
        sweep_module.search_space(kwargs["sampler"], kwargs["grid"], kwargs["space"], kwargs["overrides"],
                                  kwargs["n_trials"], kwargs["variants"])


def test_a_misspelt_key_of_a_variant_fails_before_any_trial_runs(tmp_path, no_training):
    with pytest.raises(ValueError, match="variants b: 'model.init_args.lrr' is not a key .*did you mean "
                                         "model.init_args.lr\\?"):
        sweep([TINY], str(tmp_path / "sweep"), "val/l", variants={"a": {}, "b": {"model.init_args.lrr": 1}})
    assert not (tmp_path / "sweep").exists()


SWEEPS = ROOT / "configs" / "sweeps"


def shipped_sweep(name: str) -> dict:
    """A shipped sweep file's arguments as the CLI hands them to `sweep`, its configs this tree's files (the
    presets may resolve to another checkout's folder in an editable install)."""
    from vfusion3d_lightning.cli import build_parser

    parser = build_parser()
    arguments = vars(parser.instantiate(parser.parse_args(["sweep", "--config", str(SWEEPS / f"{name}.yaml")]))
                     ["sweep"])
    arguments.pop("config")
    # a trainer.callbacks list stays YAML for the trials' LightningCLI: the sweep's parser builds no callback
    for changes in [arguments["overrides"] or {}, *arguments["variants"].values()]:
        assert json.loads(json.dumps(changes)) == changes
    for config in arguments["configs"]:  # shipped configs' names, which a wheel install finds too
        assert Path(sweep_module.config_file(config)).is_file() and not Path(config).exists()
    arguments["configs"] = [str(ROOT / "configs" / f"{config}.yaml") for config in arguments["configs"]]
    return arguments


@pytest.mark.parametrize("name, variants", [
    ("paper_ablations_tiny", ["multistage", "random_resolution", "lpips_mse", "no_opacity", "no_restart"]),
    ("paper_ablations_small_gpu", ["multistage", "random_resolution", "lpips_mse", "no_opacity", "no_restart"]),
    ("paper_finetune_views_tiny", ["finetune_32_views", "finetune_16_views"]),
    ("paper_finetune_views_small_gpu", ["finetune_32_views", "finetune_16_views"]),
])
def test_the_shipped_ablation_sweeps_name_every_paper_variant_and_check_against_their_configs(name, variants,
                                                                                             no_training, capsys):
    arguments = shipped_sweep(name)
    assert list(arguments["variants"]) == variants and arguments["variants"][variants[0]] in ({}, {
        "data.init_args.views_per_object": 32})
    sweep(**{**arguments, "dry_run": True})  # every key and value of every variant checked by LightningCLI's parser
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(variants) + 1 and all(f"trial-{i:03d}_{v}" in printed[i] for i, v in
                                                   enumerate(variants))


@pytest.mark.slow
def test_the_tiny_paper_ablation_sweep_runs_end_to_end(tmp_path, shards):
    """configs/sweeps/paper_ablations_tiny.yaml as shipped, its trials cut to one step and one validation on 32-px
    data (five `fit` processes, two at a time: most of the time is their start)."""
    from PIL import Image

    arguments = shipped_sweep("paper_ablations_tiny")
    overrides = {**fast(shards), "trainer.max_epochs": 1, "model.init_args.val_render_size": 16}
    overrides.pop("model.init_args.lpips_weight")  # LPIPS is the recipe's loss: keep it
    arguments.update(out=str(tmp_path / "ablations"), overrides=overrides, n_jobs=2, progress=False)
    result = sweep(**arguments)
    assert result["complete"] == 5 and not result["failed_now"]
    out = tmp_path / "ablations"
    names = ["multistage", "random_resolution", "lpips_mse", "no_opacity", "no_restart"]
    comparison = csv_rows(out / "comparison.csv")
    assert [row["variant"] for row in comparison] == names and {row["status"] for row in comparison} == {"COMPLETE"}
    metrics = ["val/psnr", "val/lpips", "val/ssim"]
    for row in comparison:
        assert all(math.isfinite(float(row[m])) and math.isfinite(float(row[f"Δ {m}"])) for m in metrics), row
        assert row["step"] == "1"
    assert all(float(comparison[0][f"Δ {m}"]) == 0 for m in metrics)
    for name in ("comparison.png", "curves.png", "ranking.png"):
        with Image.open(out / name) as image:
            image.verify()
    # each variant ran what it names
    def config(variant):
        (folder,) = out.glob(f"trial-*_{variant}")
        return yaml.safe_load(next(folder.glob("lightning_logs/version_*/config.yaml")).read_text())

    callbacks = {name: [c["class_path"].rsplit(".", 1)[1] for c in config(name)["trainer"]["callbacks"]]
                 for name in names}
    assert callbacks["multistage"][:2] == ["ResolutionStages", "LRRestartAtStage"]
    assert "RandomResolution" in callbacks["random_resolution"] and "ResolutionStages" not in callbacks[
        "random_resolution"]
    assert "ResolutionStages" in callbacks["no_restart"] and "LRRestartAtStage" not in callbacks["no_restart"]
    assert config("lpips_mse")["model"]["init_args"]["l2_weight"] == 1.0
    assert config("no_opacity")["model"]["init_args"]["opacity_weight"] == 0.0
    assert config("multistage")["model"]["init_args"]["l2_weight"] == 0.0


@pytest.mark.slow
def test_the_tiny_finetune_views_sweep_runs_end_to_end(tmp_path, shards):
    """configs/sweeps/paper_finetune_views_tiny.yaml as shipped (32 vs 16 views per object), from a saved tiny
    LRM, its two trials cut to one step and one validation."""
    from vfusion3d_lightning.models.lrm import LRM, LRMConfig

    pretrained = LRM(LRMConfig.from_name("tiny")).save_pretrained(tmp_path / "pretrained")
    arguments = shipped_sweep("paper_finetune_views_tiny")
    overrides = {**fast(shards), "trainer.max_epochs": 1, "model.init_args.val_render_size": 16,
                 "model.init_args.pretrained": str(pretrained)}
    arguments.update(out=str(tmp_path / "views"), overrides=overrides, n_jobs=2, progress=False)
    result = sweep(**arguments)
    assert result["complete"] == 2 and not result["failed_now"]
    out = tmp_path / "views"
    comparison = csv_rows(out / "comparison.csv")
    assert [row["variant"] for row in comparison] == ["finetune_32_views", "finetune_16_views"]
    assert all(math.isfinite(float(row["val/psnr"])) for row in comparison)
    for variant, views in (("finetune_32_views", 32), ("finetune_16_views", 16)):
        (folder,) = out.glob(f"trial-*_{variant}")
        config = yaml.safe_load(next(folder.glob("lightning_logs/version_*/config.yaml")).read_text())
        assert config["data"]["init_args"]["views_per_object"] == views
        assert config["model"]["init_args"]["pretrained"] == str(pretrained)
