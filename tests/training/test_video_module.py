"""VideoDiffusionModule: temporal-only fine-tuning that lowers the loss, `fit --config configs/video/tiny.yaml`
on procedural orbit renders with sample grids, EMA and resumable checkpoints, and small checkpoints over a
pretrained base."""

import csv
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.models.video import VideoDiffusionModel
from vfusion3d_lightning.training import VideoDiffusionModule

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "video" / "tiny.yaml")


@pytest.fixture(scope="module")
def orbit_shards(tmp_path_factory, procedural_shards):
    return procedural_shards(tmp_path_factory.mktemp("video_data"), 4, seed=3, views="orbit16", resolution=32)


def repeated_batch() -> dict:
    torch.manual_seed(1)
    frames = torch.rand(2, 16, 3, 32, 32) * 0.3 + torch.linspace(0, 0.7, 16).view(1, 16, 1, 1, 1)
    return {"frames": frames, "prompt": ["a red chair", "a blue car"]}


@pytest.mark.parametrize("architecture", ["tiny-svd", "tiny-i2vgen-xl"])
def test_training_steps_lower_the_loss_and_touch_only_temporal_layers(architecture):
    torch.manual_seed(0)
    module = VideoDiffusionModule(model=architecture, condition_dropout=0.0)
    batch = repeated_batch()
    before_params = {n: p.detach().clone() for n, p in module.model.unet.named_parameters()}

    def held_out_loss() -> float:  # fixed noise and timesteps
        with torch.no_grad():
            return sum(float(module._loss(batch, torch.Generator().manual_seed(s))) for s in range(4)) / 4

    start = held_out_loss()
    params = [p for p in module.model.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    for step in range(40):
        loss = module._loss(batch, torch.Generator().manual_seed(100 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = held_out_loss()
    assert end < 0.8 * start, (start, end)
    changed = {n for n, p in module.model.unet.named_parameters() if not torch.equal(p, before_params[n])}
    trained = {n for n, p in module.model.unet.named_parameters() if p.requires_grad}
    assert changed and changed <= trained and len(trained) < len(before_params)


def metrics(root: Path) -> list[dict]:
    files = sorted(root.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    with files[-1].open() as handle:
        return list(csv.DictReader(handle))


def test_fit_tiny_config_writes_samples_resumes_and_exports(orbit_shards, tmp_path, caplog):
    L.seed_everything(0)
    common = ["--data.init_args.train_shards", orbit_shards, "--data.init_args.val_shards", orbit_shards,
              "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", TINY, *common, "--trainer.max_epochs", "1"])
    assert "training 471,872 temporal of 1,349,384 UNet parameters" in caplog.text
    run = tmp_path / "lightning_logs" / "version_0"
    samples = sorted((run / "samples").glob("*.png"))
    assert samples and samples[0].stat().st_size > 0
    rows = metrics(tmp_path)
    assert any(row.get("train/loss") for row in rows) and any(row.get("val/loss") for row in rows)
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["ema"]["updates"] == 4 and checkpoint["global_step"] == 4

    # resume for one more epoch: the step count and the EMA continue
    main(["fit", "--config", TINY, *common, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    resumed = torch.load(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt",
                         map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 8 and resumed["ema"]["updates"] == 8

    # the checkpoint loads as a video model with the averaged weights
    model = VideoDiffusionModel.from_pretrained(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt")
    name = next(n for n in resumed["ema"]["shadow"])
    assert torch.equal(dict(model.unet.named_parameters())[name].detach(), resumed["ema"]["shadow"][name])
    assert not torch.equal(resumed["state_dict"][f"model.unet.{name}"], resumed["ema"]["shadow"][name])


def test_checkpoints_over_a_pretrained_base_hold_only_trained_weights(tmp_path):
    torch.manual_seed(0)
    base = VideoDiffusionModel.build("tiny-svd").save_pretrained(tmp_path / "base")
    module = VideoDiffusionModule(model=str(base))
    assert not module.strict_loading
    with torch.no_grad():  # pretend training moved the temporal weights
        for param in module.model.unet.parameters():
            if param.requires_grad:
                param.add_(0.5)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    trained = {f"model.unet.{n}" for n, p in module.model.unet.named_parameters() if p.requires_grad}
    assert keys == trained
    fresh = VideoDiffusionModule(model=str(base))
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), module.state_dict().values()))
    del checkpoint["state_dict"][sorted(trained)[0]]
    with pytest.raises(KeyError, match="lacks 1 trained parameters"):
        fresh.on_load_checkpoint(checkpoint)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="condition_dropout"):
        VideoDiffusionModule(condition_dropout=1.5)
    module = VideoDiffusionModule()
    with pytest.raises(ValueError, match="multiples of 8"):
        module._loss({"frames": torch.rand(1, 16, 3, 20, 20), "prompt": [""]})
