"""The whole pipeline end to end on a smaller quickstart: killed in LRM pre-training and at seeded random moments,
resumed each time, ending byte for byte as an uninterrupted run."""

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
import webdataset as wds
import yaml
from PIL import Image
from safetensors import safe_open

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.commands import pipeline
from vfusion3d_lightning.commands.pipeline import STAGES, Stage
from vfusion3d_lightning.data.schema import complete_shards, decode_sample
from vfusion3d_lightning.io import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "pipeline" / "quickstart.yaml"
QUIET = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}


def small_quickstart(tmp_path: Path) -> Path:
    """configs/pipeline/quickstart.yaml with fewer assets, videos, steps and samples."""
    data = yaml.safe_load(QUICKSTART.read_text())
    for run in (data["video"], data["features"], data["quality"]["run"], data["elevation"], data["lrm_pretrain"],
                data["lrm_finetune"]):
        run["config"] = str((QUICKSTART.parent / run["config"]).resolve())
        run["overrides"] = {**run.get("overrides", {}), **QUIET}
    data["run_dir"] = str(tmp_path / "run")
    data["assets"].update(count=12, held_out=1, real=["bunny"])  # 1 procedural + 1 real held out
    data["render"].update(resolution=48, workers=1, shard_size=4)
    data["prompts"].update(count=12)
    data["images"].update(max_prompts=8, batch_size=4)
    data["generate"].update(batch_size=4, shard_size=4)
    data["lrm_pretrain"]["overrides"]["data.init_args.samples_per_epoch"] = 8  # 2 epochs of 4 steps
    data["lrm_finetune"]["overrides"]["data.init_args.samples_per_epoch"] = 16  # 4 epochs of 4 steps
    data["evaluate"].update(max_objects=2)
    data["export"].update(images=1, frames=8, mesh_resolution=32)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def records(run_dir: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sorted(run_dir.glob("*/stage.json"))}


def test_pipeline_config_errors_name_the_key(tmp_path):
    import argparse

    with pytest.raises(argparse.ArgumentError, match="cout"):
        main(["pipeline", "--config", str(QUICKSTART), "--assets.cout", "5"])
    with pytest.raises(argparse.ArgumentError, match="missing.yaml"):
        main(["pipeline", "--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("video:\n  config: no_such.yaml\n")
    with pytest.raises(argparse.ArgumentError, match="no_such.yaml"):
        main(["pipeline", "--config", str(bad)])


def test_pipeline_config_prints_and_reads_back(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "--config", str(QUICKSTART), "--assets.count", "7", "--print_config"])
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["assets"]["count"] == 7
    copy = QUICKSTART.parent / f".printed-{tmp_path.name}.yaml"  # beside the original: its paths are relative
    try:
        copy.write_text(printed)
        with pytest.raises(SystemExit):
            main(["pipeline", "--config", str(copy), "--print_config"])
        assert capsys.readouterr().out == printed
    finally:
        copy.unlink()


# ---------------------------------------------------------------- fault injection

KILLS = 3  # one in LRM pre-training, two in random stages (each kill and rerun costs CI time)
COMPARED = (".tar", ".safetensors", ".gif", ".glb", ".png", ".csv", ".npy")


@pytest.fixture
def jobs():
    """Starts the real command in its own process group, as a scheduler starts (and kills) a job; kills what is
    left of them when the test ends, however it ends."""
    started: list[subprocess.Popen] = []

    def run_pipeline(config_path: Path, log: Path) -> subprocess.Popen:
        job = subprocess.Popen([sys.executable, "-m", "vfusion3d_lightning.cli", "pipeline", "--config",
                                str(config_path)], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=log.parent,
                               start_new_session=True)
        started.append(job)
        return job

    yield run_pipeline
    for job in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def fingerprint(run_dir: Path) -> dict[str, str]:
    """A digest of every shard, feature table, exported weight, image, mesh and metrics table of a run, by path:
    bytes, except that the run folder's name and Lightning's log version (a resumed fit logs anew) are taken out of
    the provenance records inside shards (JSON) and feature tables (metadata). Training logs and checkpoints (which
    hold times and restarts) are left out, and so are CSV columns of seconds."""
    def plain(text: str) -> bytes:
        return re.sub(r"version_\d+", "version_N", text.replace(str(run_dir), "RUN")).encode()

    found = {}
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir).as_posix()
        if not path.is_file() or path.suffix not in COMPARED or "lightning_logs" in relative:
            continue
        digest = hashlib.sha256()
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in sorted(tar.getmembers(), key=lambda m: m.name):
                    data = tar.extractfile(member).read()
                    data = plain(data.decode()) if member.name.endswith(".json") else data
                    digest.update(member.name.encode() + data)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "np") as table:
                digest.update(plain(json.dumps(table.metadata(), sort_keys=True)))
                for key in sorted(table.keys()):
                    digest.update(key.encode() + table.get_tensor(key).tobytes())
        elif path.suffix == ".csv":  # without timings (evaluate's mesh_seconds)
            rows = list(csv.reader(io.StringIO(path.read_text())))
            keep = [i for i, name in enumerate(rows[0] if rows else []) if not name.endswith("seconds")]
            digest.update(plain("\n".join(",".join(row[i] for i in keep) for row in rows)))
        else:
            digest.update(path.read_bytes())
        found[relative] = digest.hexdigest()
    return found


def numbers(run_dir: Path) -> dict:
    """summary.json's outputs (counts, metrics, paths) with the run folder's name and log versions taken out."""
    text = json.dumps(json.loads((run_dir / "summary.json").read_text())["outputs"], sort_keys=True)
    text = re.sub(r"version_\d+", "version_N", text.replace(str(run_dir), "RUN"))  # a resumed fit logs anew
    return json.loads(text)


def running_stage(log: Path) -> str | None:
    started = re.findall(r"^\[\d+/\d+\] (\w+) \.\.\.$", log.read_text(), flags=re.M)
    return started[-1] if started else None


def check_outputs(config_path: Path, run_dir: Path) -> None:
    """Every stage's outputs of a small quickstart run: counts, captions, videos, labels, models, evaluation tables,
    summary, report, turntable and mesh."""
    config = yaml.safe_load(config_path.read_text())
    outputs = {s.name: json.loads((run_dir / s.name / "stage.json").read_text())["outputs"] for s in STAGES}
    assert outputs["assets"]["train_assets"] == 12 and outputs["render"]["held_out32_objects"] == 2
    assert outputs["captions"]["captioned_objects"] == 14  # 12 training + 2 held-out assets, each captioned once
    assert outputs["prompts"]["captions"] == 12 and outputs["images"]["written"] == 8
    for name in ("orbit16", "held_out32"):
        captioned = [decode_sample(raw) for raw in wds.WebDataset(
            [str(p) for p in complete_shards(outputs["captions"][name])], shardshuffle=False)]
        assert captioned and all(sample.prompt for sample in captioned)
    assert outputs["generate"]["generated"] == 8
    first_frames = sorted(Path(outputs["images"]["images"]).glob("*.txt"))
    videos = [decode_sample(raw) for raw in wds.WebDataset(
        [str(p) for p in complete_shards(outputs["generate"]["videos"])], shardshuffle=False)]
    assert sorted(v.prompt for v in videos) == sorted(p.read_text().strip() for p in first_frames)
    assert outputs["filter"]["kept"] + outputs["filter"]["dropped"] == 8
    labelled = [decode_sample(raw, require_cameras=True) for raw in wds.WebDataset(
        [str(p) for p in complete_shards(outputs["label"]["labelled_videos"])], shardshuffle=False)]
    assert len(labelled) == outputs["filter"]["kept"] == outputs["label"]["labelled"]
    assert all(s.extra["mask_method"] == "threshold" and s.images.shape == (16, 32, 32, 4) for s in labelled)
    assert (Path(outputs["quality"]["quality_svm"]) / "model.skops").is_file()
    assert (Path(outputs["elevation"]["elevation_mlp"]) / "model.safetensors").is_file()
    for name in ("pretrained", "finetuned"):
        stage = outputs[f"lrm_{'pretrain' if name == 'pretrained' else 'finetune'}"]
        assert (Path(stage[name]) / "model.safetensors").is_file()
        rows = (run_dir / "evaluate" / name / "objects.csv").read_text().splitlines()
        assert len(rows) == 3 and rows[1].endswith(",31")  # header + 2 objects, 31 novel views each
        header = rows[0].split(",")
        assert all(row.split(",")[header.index("clip_text")] not in ("", "nan") for row in rows[1:])
        bunny = next(row.split(",") for row in rows[1:] if row.startswith("real_bunny,"))  # the real mesh
        assert float(bunny[header.index("chamfer")]) > 0 and 0 <= float(bunny[header.index("fscore@0.1")]) <= 1
    summary = (run_dir / "summary.md").read_text()
    assert "| pretrained | 2 | 31 |" in summary and "| finetuned | 2 | 31 |" in summary
    # geometry columns, and a row per evaluation set: the real mesh apart from the procedural one
    assert "Chamfer" in summary and "F-score@0.1" in summary and "| finetuned: real | 1/1 | 0 |" in summary
    report = Path(outputs["evaluate"]["report"])  # the evaluate stage's page, listed in the run's summary
    assert report == run_dir / "evaluate" / "report.html" and f"- report: {report}" in summary
    assert all((report.parent / src).is_file() for src in re.findall(r'<img [^>]*src="([^"]+)"', report.read_text()))
    gif = next(Path(p) for p in outputs["export"]["files"] if p.endswith(".gif"))
    with Image.open(gif) as video:
        assert video.n_frames == config["export"]["frames"]
    mesh = trimesh.load(next(p for p in outputs["export"]["files"] if p.endswith(".glb")), force="mesh")
    assert len(mesh.faces) > 0 and np.isfinite(mesh.vertices).all()
    assert json.loads((run_dir / "summary.json").read_text())["outputs"]["filter"]["kept"] == outputs["filter"]["kept"]


@pytest.mark.slow
def test_the_pipeline_killed_at_random_moments_ends_as_an_uninterrupted_run(tmp_path, jobs, capsys, monkeypatch):
    """SIGKILL to the whole process group in LRM pre-training once it has a checkpoint, and at seeded random moments
    in seeded random stages, with a rerun after each; the outputs must equal an uninterrupted run's, no
    half-written file may be left, finished stages are skipped and the killed fit goes on from its checkpoint."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "faulted").mkdir()
    whole = jobs(small_quickstart(tmp_path / "whole"), tmp_path / "whole" / "log.txt")
    assert whole.wait(timeout=900) == 0, (tmp_path / "whole" / "log.txt").read_text()[-3000:]
    seconds = json.loads((tmp_path / "whole" / "run" / "summary.json").read_text())["stage_seconds"]

    config_path = small_quickstart(tmp_path / "faulted")
    run_dir = tmp_path / "faulted" / "run"
    order = [stage.name for stage in STAGES]
    training = order.index("lrm_pretrain")
    rng = np.random.default_rng(24)
    # besides pre-training, distinct stages before evaluate and export (which end too soon to be sure of a kill
    # in them): 1 of the 4 others that took longest (rendering, training) and 1 of the rest, in their order
    by_time = sorted((i for i in range(len(order) - 2) if i != training), key=lambda i: -seconds[order[i]])
    targets = sorted([training, *rng.choice(by_time[:4], KILLS - 2, replace=False), *rng.choice(by_time[4:], 1)])
    killed_in, before, resumed_log = [], None, None
    for attempt, target in enumerate(targets):
        log = tmp_path / "faulted" / f"attempt{attempt}.txt"
        job = jobs(config_path, log)
        if before is not None and resumed_log is None:
            resumed_log = log  # the run after the kill in pre-training
        while job.poll() is None and (running_stage(log) is None or order.index(running_stage(log)) < target):
            time.sleep(0.05)
        if target == training:  # once training has a checkpoint
            deadline = time.time() + 600
            while job.poll() is None and not list((run_dir / "lrm_pretrain").rglob("last.ckpt")):
                assert time.time() < deadline, "LRM pre-training wrote no checkpoint in 10 minutes"
                time.sleep(0.05)
        else:  # a moment within the stage's time in the whole run, or its end if this run is faster
            deadline = time.time() + rng.uniform(0, 0.8) * seconds[order[target]]
            while time.time() < deadline and f"] {order[target]}: done" not in log.read_text():
                time.sleep(0.05)
        assert job.poll() is None, f"the job ended before kill {attempt + 1}: {log.read_text()[-2000:]}"
        killed_in.append(running_stage(log))
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        if target == training:
            before = records(run_dir)
            assert list(before) == sorted(order[:training])
            assert not (run_dir / "lrm_pretrain" / "stage.json").exists()
    log = tmp_path / "faulted" / "final.txt"
    assert jobs(config_path, log).wait(timeout=900) == 0, log.read_text()[-3000:]
    resumed = (resumed_log or log).read_text()
    for number, stage in enumerate(order[:training], 1):
        assert f"[{number}/{len(STAGES)}] {stage}: done before, skipped" in resumed
    assert {name: text for name, text in records(run_dir).items() if name in before} == before
    # the killed training went on from its checkpoint instead of starting again
    versions = sorted((run_dir / "lrm_pretrain" / "lightning_logs").glob("version_*"))
    assert len(versions) == 2
    with open(versions[1] / "metrics.csv") as handle:
        resumed_steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert min(resumed_steps) > 0 and max(resumed_steps) == 7  # the last of 2 epochs of 4 steps

    left = [p for p in run_dir.rglob("*") if ".partial" in p.name or p.name == LOCK_NAME]
    assert not left, f"half-written files left: {left}"
    assert numbers(run_dir) == numbers(tmp_path / "whole" / "run")
    expected = fingerprint(tmp_path / "whole" / "run")
    assert sum(name.endswith(".tar") for name in expected) >= 10 and any(n.endswith(".glb") for n in expected)
    differ = sorted(name for name, digest in fingerprint(run_dir).items() if expected.get(name) != digest)
    assert not differ and len(fingerprint(run_dir)) == len(expected), (killed_in, differ)
    assert len(set(killed_in)) >= 3, killed_in  # kills in several stages
    print(f"{KILLS} kills survived, in stages {killed_in}; {len(expected)} output files identical")
    check_outputs(config_path, run_dir)

    # a finished run is all skipped
    assert main(["pipeline", "--config", str(config_path)]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == len(STAGES)

    # a stage added in the middle runs; the finished stages around it stay valid (folders are named by stage)
    def stage_extra(pipe, folder):
        (folder / "made.txt").write_text("x")
        return {"made": 1}

    added = (*STAGES[:2], Stage("extra", stage_extra, ("render",), lambda c: c.seed), *STAGES[2:])
    monkeypatch.setattr(pipeline, "STAGES", added)
    assert main(["pipeline", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == len(STAGES) and f"[3/{len(STAGES) + 1}] extra: done in" in out
    assert (run_dir / "extra" / "made.txt").is_file()
