"""Validation turntables reach every logger: CSV (PNG/MP4 files in the log folder, the default) and TensorBoard
(image summaries in the event file) from a real tiny fit; the W&B and MLflow calls by their documented APIs; a
missing logger package is the extra's pip line."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from PIL import Image

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.training.lightning_cli import lightning_cli
from vfusion3d_lightning.training.media import log_image, log_video

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "lrm" / "tiny.yaml")
VAL_SIZE, FRAMES = 32, 6  # tiny.yaml: val_render_size, turntable_frames


@pytest.fixture(scope="module")
def shards(tmp_path_factory, procedural_shards):
    return procedural_shards(tmp_path_factory.mktemp("logger_data"), 4, seed=3, views="random32", resolution=48)


def fit(shards: str, root: Path, *extra: str) -> None:
    """One short epoch of configs/lrm/tiny.yaml with one validation (its turntable)."""
    assert main(["fit", "--config", TINY, "--data.init_args.train_shards", shards,
                 "--data.init_args.val_shards", shards, "--trainer.default_root_dir", str(root),
                 "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", "1",
                 "--trainer.check_val_every_n_epoch", "1", "--data.init_args.samples_per_epoch", "4",
                 "--data.init_args.val_samples", "2", "--data.init_args.num_workers", "0", *extra]) == 0


def check_turntable_files(log_dir: Path) -> None:
    [png] = sorted((log_dir / "turntables").glob("*.png"))
    [mp4] = sorted((log_dir / "turntables").glob("*.mp4"))
    assert png.name == mp4.with_suffix(".png").name == "epoch000_step0000002.png"
    assert Image.open(png).size == ((FRAMES + 1) * VAL_SIZE, VAL_SIZE)  # input view + turntable, one strip
    assert mp4.read_bytes()[4:8] == b"ftyp"


def test_default_csv_logger_writes_media_files(shards, tmp_path):
    fit(shards, tmp_path)  # no logger named: the project's default, CSV, whatever else is installed
    log_dir = tmp_path / "lightning_logs" / "version_0"
    assert (log_dir / "metrics.csv").is_file() and not list(log_dir.glob("events.out.tfevents.*"))
    check_turntable_files(log_dir)


def test_tensorboard_logger_gets_image_summaries(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the [test] extra has it

    fit(shards, tmp_path, "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir", str(tmp_path))
    log_dir = tmp_path / "lightning_logs" / "version_0"
    [events] = log_dir.glob("events.out.tfevents.*")
    summaries = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
    assert {"val/turntable", "val/turntable_video"} <= set(summaries.Tags()["images"])
    [strip] = summaries.Images("val/turntable")
    assert (strip.step, strip.width, strip.height) == (2, (FRAMES + 1) * VAL_SIZE, VAL_SIZE)
    [video] = summaries.Images("val/turntable_video")
    assert video.step == 2 and video.width * video.height >= FRAMES * VAL_SIZE * VAL_SIZE  # the frames, tiled
    assert "val/psnr" in summaries.Tags()["scalars"]
    check_turntable_files(log_dir)  # the files too, whichever the logger


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class FakeWandb(WandbLogger):
    """WandbLogger's media methods, recorded (wandb is an optional extra)."""

    def __init__(self):
        self.recorder = Recorder()

    def log_image(self, key, images, step=None, **kwargs):
        self.recorder.log_image(key=key, images=images, step=step, **kwargs)

    def log_video(self, key, videos, step=None, **kwargs):
        self.recorder.log_video(key=key, videos=videos, step=step, **kwargs)


class FakeMLflow(MLFlowLogger):
    """MLFlowLogger whose client (`experiment`) is recorded (mlflow is an optional extra)."""

    def __init__(self):
        self.client = Recorder()

    @property
    def experiment(self):
        return self.client

    @property
    def run_id(self):
        return "run-1"


def test_wandb_and_mlflow_get_media_through_their_apis(tmp_path):
    wandb, mlflow = FakeWandb(), FakeMLflow()
    trainer = SimpleNamespace(loggers=[wandb, mlflow], logger=None, default_root_dir=str(tmp_path), current_epoch=1,
                              global_step=7)
    image = np.zeros((8, 24, 3), np.uint8)
    png = log_image(trainer, "val/turntable", image, "turntables")
    mp4 = log_video(trainer, "val/turntable_video", torch.rand(4, 3, 16, 16), "turntables", fps=4)
    assert png == tmp_path / "turntables" / "epoch001_step0000007.png" and png.is_file()
    assert mp4 == tmp_path / "turntables" / "epoch001_step0000007.mp4" and mp4.read_bytes()[4:8] == b"ftyp"
    [(name, _, kwargs), (video_name, _, video_kwargs)] = wandb.recorder.calls
    assert (name, kwargs["key"], kwargs["step"]) == ("log_image", "val/turntable", 7)
    assert kwargs["images"][0] is image
    assert (video_name, video_kwargs) == ("log_video", {"key": "val/turntable_video", "videos": [str(mp4)],
                                                        "step": 7, "format": ["mp4"]})
    [(name, args, kwargs), (artifact, artifact_args, artifact_kwargs)] = mlflow.client.calls
    assert (name, args[0], kwargs) == ("log_image", "run-1", {"artifact_file": "val/turntable/step0000007.png"})
    assert args[1] is image
    assert (artifact, artifact_args, artifact_kwargs) == ("log_artifact", ("run-1", str(mp4)),
                                                          {"artifact_path": "val/turntable_video"})


@pytest.mark.parametrize("logger, package, extra", [("WandbLogger", "wandb", "wandb"),
                                                    ("MLFlowLogger", "mlflow", "mlflow")])
def test_a_missing_logger_package_names_the_extra(monkeypatch, tmp_path, logger, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'vfusion3d-lightning\[{extra}\]'"):
        lightning_cli(["--config", TINY, "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.logger", f"lightning.pytorch.loggers.{logger}"], run=False)
