"""`vfusion3d-lightning sweep`: grid parsing, trial names, random draws, the results table, and end-to-end sweeps
of the tiny LRM config (one `fit` subprocess per trial) that resume and survive a failing trial."""

import argparse
import csv
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from vfusion3d_lightning.commands import sweep
from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "lrm" / "tiny.yaml")
LR = "model.init_args.lr"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vfusion3d-lightning sweep")
    sweep.add_arguments(parser)
    return parser.parse_args(list(argv))


def fast(shards: str) -> list[str]:
    """--set overrides that make a tiny LRM trial one training step plus one validation on CPU."""
    sets = ["trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"data.init_args.train_shards={shards}", f"data.init_args.val_shards={shards}",
            "data.init_args.num_workers=0", "data.init_args.samples_per_epoch=2", "data.init_args.val_samples=2",
            "data.init_args.num_supervision_views=2", "model.init_args.lpips_weight=0.0",
            "model.init_args.turntable_frames=2"]
    return [word for s in sets for word in ("--set", s)]


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------- parsing, planning


def test_grid_values_are_yaml_scalars():
    key, values = sweep.parse_grid("model.init_args.lr=[1e-4, 4E-4, 3, 0.5, true, null, adam, '1e-4', [1, 2]]")
    assert key == LR
    assert values == [1e-4, 4e-4, 3, 0.5, True, None, "adam", "1e-4", [1, 2]]
    assert [type(v) for v in values] == [float, float, int, float, bool, type(None), str, str, list]
    assert sweep.parse_grid("trainer.precision=[32, bf16-mixed]") == ("trainer.precision", [32, "bf16-mixed"])
    assert sweep.parse_grid(" a.b = [1,true] ") == ("a.b", [1, True])  # 1 and true are different values
    assert sweep.parse_set("trainer.max_epochs=2") == ("trainer.max_epochs", "2")
    assert sweep.parse_set("trainer.callbacks+=a.B") == ("trainer.callbacks+", "a.B")


@pytest.mark.parametrize("bad, says", [
    ("model.init_args.lr", "expected KEY=\\[v1,v2,...\\]"),
    ("model.init_args.lr=1e-4", "must be a bracketed list"),
    ("model.init_args.lr=[]", "at least one value"),
    ("model.init_args.lr=[1e-4, [2]", "not valid YAML"),
    ("model.init_args.lr=[1e-4,1e-4]", "0.0001 is given twice"),
    ("=[1,2]", "expected KEY="),
    ("model lr=[1,2]", "expected KEY="),
])
def test_malformed_grid_is_an_error_naming_the_argument(bad, says, capsys):
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        sweep.parse_grid(bad)
    with pytest.raises(SystemExit):
        parse("--config", TINY, "--out", "x", "--monitor", "val/lpips", "--grid", bad)
    err = capsys.readouterr().err
    assert "argument --grid" in err and repr(bad) in err


def test_malformed_set_is_an_error_naming_the_argument(capsys):
    with pytest.raises(SystemExit):
        parse("--config", TINY, "--out", "x", "--monitor", "m", "--grid", "a=[1]", "--set", "trainer.max_epochs")
    assert "argument --set: 'trainer.max_epochs': expected KEY=VALUE" in capsys.readouterr().err


def test_trial_names_and_the_cartesian_product():
    grid = [sweep.parse_grid("model.init_args.lr=[1e-4,4e-4]"),
            sweep.parse_grid("model.init_args.lpips_weight=[0.5,1.0]")]
    trials = sweep.plan_trials(grid)
    assert [t.name for t in trials] == ["trial-000_lr=0.0001_lpips_weight=0.5", "trial-001_lr=0.0001_lpips_weight=1.0",
                                        "trial-002_lr=0.0004_lpips_weight=0.5", "trial-003_lr=0.0004_lpips_weight=1.0"]
    assert trials[2].overrides == {LR: 4e-4, "model.init_args.lpips_weight": 0.5}
    assert sweep.plan_trials(grid) == trials  # stable
    # same last component: the shortest distinguishing suffix, `init_args` left out
    clash = sweep.plan_trials([("model.init_args.lr", [0.1]), ("data.init_args.lr", [2])])
    assert clash[0].name == "trial-000_model.lr=0.1_data.lr=2"
    # unsafe characters become `-`; bools as true/false; long names are cut, the index keeps them unique
    odd = sweep.plan_trials([("model.init_args.network", ["network/tiny v2.yaml", "x" * 300]), ("a.flag", [True])])
    assert odd[0].name == "trial-000_network=network-tiny-v2.yaml_flag=true"
    assert len(odd[1].name) <= 130 and odd[1].name.startswith("trial-001_network=xxx")
    assert len(sweep.plan_trials([("a", list(range(1200)))])[-1].name.split("_")[0]) == len("trial-1199")


def test_trial_command_appends_the_result_callback():
    (trial,) = sweep.plan_trials([("model.init_args.lr", [1e-4])])
    command = sweep.trial_command(["a.yaml", "b.yaml"], [("trainer.max_epochs", "2")], trial, Path("out"))
    assert command == ["fit", "--config", "a.yaml", "--config", "b.yaml", "--trainer.max_epochs=2",
                       "--model.init_args.lr=0.0001", f"--trainer.default_root_dir={Path('out') / trial.name}",
                       "--trainer.callbacks+=vfusion3d_lightning.training.callbacks.SweepResult"]


def test_the_callback_path_names_the_callback_and_the_command_does_not_import_lightning():
    import sys

    import lightning as L

    from vfusion3d_lightning.training.callbacks import SweepResult

    assert issubclass(SweepResult, L.Callback) and f"vfusion3d_lightning.training.callbacks.{SweepResult.__name__}" == sweep.CALLBACK
    # the command's parser imports this module: that must not pay for importing Lightning
    probe = "import sys, vfusion3d_lightning.commands.sweep; print('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_random_draws_distinct_combinations_reproducibly():
    grid = [("a", [1, 2, 3, 4]), ("b", ["x", "y", "z", "w", "v"])]
    everything = sweep.plan_trials(grid)
    assert len(everything) == 20
    drawn = sweep.plan_trials(grid, random_trials=7, seed=1)
    combos = [tuple(t.overrides.values()) for t in drawn]
    assert len(set(combos)) == 7 and set(combos) <= {tuple(t.overrides.values()) for t in everything}
    assert [t.name for t in drawn] == [t.name for t in sweep.plan_trials(grid, random_trials=7, seed=1)]
    assert combos != [tuple(t.overrides.values()) for t in sweep.plan_trials(grid, random_trials=7, seed=2)]
    assert combos == sorted(combos, key=lambda c: ([1, 2, 3, 4].index(c[0]), "xyzwv".index(c[1])))  # grid order
    assert len({tuple(t.overrides.values()) for t in sweep.plan_trials(grid, random_trials=20, seed=3)}) == 20
    with pytest.raises(ValueError, match="--random 21: the grid has 20 combinations"):
        sweep.plan_trials(grid, random_trials=21)


@pytest.mark.parametrize("grid, sets, says", [
    ([("a", [1]), ("a", [2])], [], "--grid a is given twice"),
    ([("a", [1])], [("a", "2")], "a is both swept"),
    ([("trainer.default_root_dir", ["x"])], [], "sets it per trial"),
    ([("a", [1])], [("b", "1"), ("b", "2")], "--set b is given twice"),
    ([], [("b", "1")], "nothing to sweep"),
])
def test_conflicting_arguments_are_refused(grid, sets, says):
    with pytest.raises(ValueError, match=says):
        sweep.plan_trials(grid, sets)
    sweep.plan_trials([("a", [1])], [("trainer.callbacks+", "x.A"), ("trainer.callbacks+", "x.B")])  # appends


def test_dry_run_writes_trials_and_refuses_another_sweep_in_the_same_folder(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.run(parse("--config", TINY, "--out", str(out), "--monitor", "val/lpips", "--dry-run",
                           "--grid", "model.init_args.lr=[1e-4,4e-4]", "--set", "trainer.max_epochs=2")) == 0
    plan = json.loads((out / "trials.json").read_text())
    assert [t["overrides"] for t in plan["trials"]] == [{LR: 1e-4}, {LR: 4e-4}]
    assert plan["set"] == ["trainer.max_epochs=2"] and plan["config"] == [TINY]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and "--model.init_args.lr=0.0004" in printed[1]
    assert not any(p.is_dir() for p in out.iterdir())  # nothing ran
    with pytest.raises(ValueError, match="holds another sweep"):
        sweep.run(parse("--config", TINY, "--out", str(out), "--monitor", "val/lpips", "--dry-run",
                        "--grid", "model.init_args.lr=[1e-4,2e-4]", "--set", "trainer.max_epochs=2"))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        sweep.run(parse("--config", str(tmp_path / "missing.yaml"), "--out", str(out), "--monitor", "m",
                        "--grid", "a=[1]"))


def _fake_result(folder: Path, history: list[dict], final: dict | None = None) -> None:
    folder.mkdir(parents=True)
    (folder / sweep.RESULT_FILE).write_text(json.dumps(
        {"metrics": final or {}, "history": [{"epoch": e, "step": e, "metrics": m} for e, m in enumerate(history)],
         "log_dir": str(folder / "lightning_logs" / "version_0")}))


@pytest.mark.parametrize("mode, order", [("min", ["b", "a", "d", "c"]), ("max", ["a", "b", "d", "c"])])
def test_results_are_sorted_by_the_best_monitor_value(tmp_path, mode, order):
    trials = [sweep.Trial(name, {"x": i}) for i, name in enumerate("abcd")]
    _fake_result(tmp_path / "a", [{"val/l": 0.5, "val/p": 1.0}, {"val/l": 0.3, "val/p": 2.0}])
    _fake_result(tmp_path / "b", [{"val/l": 0.1, "val/p": 3.0}, {"val/l": 0.2, "val/p": 4.0}])
    _fake_result(tmp_path / "d", [{"val/p": 5.0}], final={"train/loss": 1.0})  # never logged val/l
    rows = sweep.results_rows(trials, tmp_path, "val/l", mode)
    assert [r["trial"] for r in rows] == order
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    best = {r["trial"]: (r["monitor"], r["epoch"], r["metrics"].get("val/p")) for r in rows}
    assert best["a"] == ((0.3, 1, 2.0) if mode == "min" else (0.5, 0, 1.0))
    assert best["b"] == ((0.1, 0, 3.0) if mode == "min" else (0.2, 1, 4.0))
    assert best["d"][0] is None and best["c"] == (None, None, None)
    text = sweep.write_results(rows, ["x"], "val/l", mode, tmp_path)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| trial | x | val/l | val/p | epoch | status | run folder |"
    assert [line.split(" | ")[0] for line in table[1:]] == [f"| {name}" for name in order]
    assert [r["trial"] for r in csv_rows(tmp_path / "results.csv")] == order
    assert csv_rows(tmp_path / "results.csv")[0]["run folder"] == f"{order[0]}/lightning_logs/version_0"


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 procedural objects as 32-px `random32` renders (what tests/modules' render_procedural_shards does)."""
    root = tmp_path_factory.mktemp("sweep_data")
    write_assets(root / "assets", 2, seed=5, progress=False)
    render_folder(root / "assets", root / "random32", RenderSettings(views="random32", resolution=32), workers=1,
                  shard_size=2, progress=False)
    return str(root / "random32" / "shard-*.tar")


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("sweeps") / "lr"
    args = parse("--config", TINY, "--out", str(out), "--grid", f"{LR}=[1e-5,1e-2]", "--monitor", "val/lpips",
                 "--mode", "min", *fast(shards))
    return out, args, sweep.run(args)


def test_sweep_runs_each_trial_in_its_own_folder_and_sorts_the_results(lr_sweep):
    out, _, code = lr_sweep
    assert code == 0
    names = ["trial-000_lr=1e-05", "trial-001_lr=0.01"]
    plan = json.loads((out / "trials.json").read_text())
    assert [(t["name"], t["overrides"]) for t in plan["trials"]] == [(names[0], {LR: 1e-5}), (names[1], {LR: 1e-2})]
    lrs, best = {}, {}
    for name in names:
        (log_dir,) = (out / name / "lightning_logs").iterdir()
        assert list((log_dir / "checkpoints").glob("*.ckpt")), f"{name} has no checkpoint"
        config = yaml.safe_load((log_dir / "config.yaml").read_text())
        lrs[name] = config["model"]["init_args"]["lr"]
        assert config["trainer"]["default_root_dir"] == str(out / name)
        callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
        assert callbacks[-1] == "vfusion3d_lightning.training.callbacks.SweepResult"
        assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks  # the config's own callbacks kept
        result = json.loads((out / name / sweep.RESULT_FILE).read_text())
        assert [h["epoch"] for h in result["history"]] == [0]  # one validation, no sanity check
        best[name] = result["history"][0]["metrics"]["val/lpips"]
        assert Path(result["checkpoints"]["last"]).is_file()
    assert lrs == {names[0]: 1e-5, names[1]: 1e-2}

    rows = csv_rows(out / "results.csv")
    assert list(rows[0]) == ["trial", LR, "val/lpips", "val/psnr", "val/ssim", "epoch", "status", "run folder"]
    assert sorted(r["trial"] for r in rows) == names and all(r["status"] == "ok" for r in rows)
    values = [float(r["val/lpips"]) for r in rows]
    assert values == sorted(values) and values == sorted(best.values())
    assert {r["trial"]: float(r["val/lpips"]) for r in rows} == best
    assert all((out / r["run folder"] / "config.yaml").is_file() for r in rows)
    assert {r["trial"]: float(r[LR]) for r in rows} == lrs
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| trial-")]
    assert [line.split(" | ")[0][2:] for line in table] == [r["trial"] for r in rows]


def test_rerun_trains_nothing(lr_sweep, monkeypatch, capsys):
    out, args, _ = lr_sweep
    results = sorted(out.glob(f"*/{sweep.RESULT_FILE}"))
    assert len(results) == 2
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in results}
    table = (out / "results.csv").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished trial was run again: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_training)
    start = time.perf_counter()
    assert sweep.run(args) == 0
    assert time.perf_counter() - start < 10
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in results} == before
    assert (out / "results.csv").read_bytes() == table
    assert not list(out.glob("*/lightning_logs/version_1"))
    assert "| trial-001_lr=0.01 |" in capsys.readouterr().out  # the table is printed


class FailingProcess:
    """Stands in for Popen: records the command, exits with code 2 at once."""

    launched: list[list[str]] = []

    def __init__(self, command, **kwargs):
        FailingProcess.launched.append(command)

    def wait(self, timeout=None):
        return 2

    def kill(self):
        pass


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, shards, monkeypatch):
    out = tmp_path / "sweep"
    args = parse("--config", TINY, "--out", str(out), "--grid", f"{LR}=[abc,1e-2]", "--monitor", "val/psnr",
                 "--mode", "max", *fast(shards))
    assert sweep.run(args) == 1  # a failure shows in the exit code
    bad, good = out / "trial-000_lr=abc", out / "trial-001_lr=0.01"
    error = (bad / "error.txt").read_text()
    assert "exit code 2" in error and "--model.init_args.lr=abc" in error
    assert "Expected a <class 'float'>. Got value: abc" in error  # the tail of the child's stderr
    assert not (bad / sweep.RESULT_FILE).exists()
    assert (good / sweep.RESULT_FILE).is_file() and list(good.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    rows = csv_rows(out / "results.csv")
    assert [(r["trial"], r["status"]) for r in rows] == [(good.name, "ok"), (bad.name, "failed")]
    assert float(rows[0]["val/psnr"]) > 0 and rows[1]["val/psnr"] == ""

    # a rerun retries the failed trial only
    FailingProcess.launched = []
    monkeypatch.setattr(subprocess, "Popen", FailingProcess)
    assert sweep.run(args) == 1
    assert len(FailingProcess.launched) == 1 and "--model.init_args.lr=abc" in FailingProcess.launched[0]
    assert "exit code 2" in (bad / "error.txt").read_text()
