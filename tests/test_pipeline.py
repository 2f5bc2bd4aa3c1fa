"""The whole pipeline end to end on a smaller quickstart, killed in the middle of LRM pre-training and resumed."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
import webdataset as wds
import yaml
from PIL import Image

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.commands import pipeline
from vfusion3d_lightning.commands.pipeline import STAGES, Stage
from vfusion3d_lightning.data.schema import complete_shards, decode_sample

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
    data["assets"].update(count=12, held_out=2)
    data["render"].update(resolution=48, workers=1, shard_size=4)
    data["generate"].update(count=8, batch_size=4, shard_size=4)
    data["lrm_pretrain"]["overrides"]["data.init_args.samples_per_epoch"] = 8  # 6 epochs of 4 steps
    data["lrm_finetune"]["overrides"]["data.init_args.samples_per_epoch"] = 8
    data["evaluate"].update(max_objects=2)
    data["export"].update(images=1, frames=8, mesh_resolution=32)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def records(run_dir: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sorted(run_dir.glob("*/stage.json"))}


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_resumes_a_killed_stage(tmp_path, capsys, monkeypatch):
    config_path = small_quickstart(tmp_path)
    run_dir = tmp_path / "run"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([sys.executable, "-m", "vfusion3d_lightning.cli", "pipeline", "--config",
                              str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.time() + 600
    while not list((run_dir / "lrm_pretrain").rglob("last.ckpt")):  # killed once training has a checkpoint
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "LRM pre-training did not start in 10 minutes"
        time.sleep(0.2)
    first.kill()
    first.wait()
    before = records(run_dir)
    assert list(before) == sorted(s.name for s in STAGES[:9])
    assert not (run_dir / "lrm_pretrain" / "stage.json").exists()

    assert main(["pipeline", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    for number, stage in enumerate(STAGES[:9], 1):
        assert f"[{number}/13] {stage.name}: done before, skipped" in out
    assert {name: text for name, text in records(run_dir).items() if name in before} == before
    # the killed training went on from its checkpoint instead of starting again
    versions = sorted((run_dir / "lrm_pretrain" / "lightning_logs").glob("version_*"))
    assert len(versions) == 2
    resumed_steps = [int(line.split(",")[1]) for line in (versions[1] / "metrics.csv").read_text().splitlines()[1:]]
    assert min(resumed_steps) > 0 and max(resumed_steps) == 23

    config = yaml.safe_load(config_path.read_text())
    outputs = {s.name: json.loads((run_dir / s.name / "stage.json").read_text())["outputs"] for s in STAGES}
    assert outputs["assets"]["train_assets"] == 12 and outputs["render"]["held_out32_objects"] == 2
    assert outputs["generate"]["generated"] == 8
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
        assert len(rows) == 3 and rows[1].endswith(",32")  # header + 2 objects, 32 views each
    summary = (run_dir / "summary.md").read_text()
    assert "| pretrained | 2 | 32 |" in summary and "| finetuned | 2 | 32 |" in summary
    gif = next(Path(p) for p in outputs["export"]["files"] if p.endswith(".gif"))
    with Image.open(gif) as video:
        assert video.n_frames == config["export"]["frames"]
    mesh = trimesh.load(next(p for p in outputs["export"]["files"] if p.endswith(".glb")), force="mesh")
    assert len(mesh.faces) > 0 and np.isfinite(mesh.vertices).all()
    assert json.loads((run_dir / "summary.json").read_text())["outputs"]["filter"]["kept"] == outputs["filter"]["kept"]

    # a finished run is all skipped
    assert main(["pipeline", "--config", str(config_path)]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 13

    # a stage added in the middle runs; the finished stages around it stay valid (folders are named by stage)
    def stage_extra(pipe, folder):
        (folder / "made.txt").write_text("x")
        return {"made": 1}

    added = (*STAGES[:2], Stage("extra", stage_extra, ("render",), lambda c: c.seed), *STAGES[2:])
    monkeypatch.setattr(pipeline, "STAGES", added)
    assert main(["pipeline", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 13 and "[3/14] extra: done in" in out
    assert (run_dir / "extra" / "made.txt").is_file()


def test_pipeline_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "--config", str(QUICKSTART), "--assets.cout", "5"])
    assert "cout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pipeline", "--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("video:\n  config: no_such.yaml\n")
    with pytest.raises(SystemExit):
        main(["pipeline", "--config", str(bad)])
    assert "no_such.yaml" in capsys.readouterr().err


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
