"""VideoDiffusionModule: temporal-only fine-tuning that lowers the loss, `fit --config configs/video/tiny.yaml`
on procedural orbit renders with sample grids, EMA and resumable checkpoints, and small checkpoints over a
pretrained base."""

import csv
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data.datamodules import VideoDataModule
from vfusion3d_lightning.models.video import VideoDiffusionModel
from vfusion3d_lightning.training import VideoDiffusionModule
from vfusion3d_lightning.training.seeding import step_global_rng

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


def fit_to_step_4(root: Path, shards: str, ckpt_path: Path | None = None) -> dict:
    """The tiny I2VGen-XL-style fine-tune of configs/video/tiny.yaml, 2 epochs of 2 steps, a checkpoint every step;
    -> the step-4 checkpoint."""
    L.seed_everything(0)
    module = VideoDiffusionModule(model="tiny-i2vgen-xl", lr=1e-3, warmup_steps=2, condition_dropout=0.1,
                                  ema_decay=0.99, sample_every_n_epochs=0)
    # the UNet's own dropout (in its temporal convolutions) is what a resumed run must draw alike
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.model.unet.modules())
    data = VideoDataModule(shards, val_shards=shards, batch_size=2, num_workers=1, num_frames=16, frame_size=32,
                           samples_per_epoch=4, val_samples=2)
    trainer = L.Trainer(default_root_dir=root, max_epochs=2, accelerator="cpu", logger=False, gradient_clip_val=1.0,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=1,
                                                   filename="{step}")])
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return torch.load(root / "ckpt" / "step=4.ckpt", map_location="cpu", weights_only=True)


def test_a_resumed_i2vgen_xl_fine_tune_ends_as_an_uninterrupted_one(orbit_shards, tmp_path):
    whole = fit_to_step_4(tmp_path / "whole", orbit_shards)
    # resumed mid-second-epoch, after the global RNG has moved differently (no steps, one fewer validation)
    resumed = fit_to_step_4(tmp_path / "resumed", orbit_shards, tmp_path / "whole" / "ckpt" / "step=3.ckpt")
    assert resumed["global_step"] == whole["global_step"] == 4
    differ = [k for k, v in whole["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(whole['state_dict'])} tensors differ, e.g. {differ[:3]}"
    moments = [(whole_state, resumed["optimizer_states"][0]["state"][index])
               for index, whole_state in whole["optimizer_states"][0]["state"].items()]
    assert moments and all(torch.equal(a[key], b[key]) for a, b in moments for key in a)
    assert all(torch.equal(v, resumed["ema"]["shadow"][k]) for k, v in whole["ema"]["shadow"].items())


def test_step_global_rng_repeats_a_step_and_leaves_the_global_rng_as_it_was():
    def draws(rank: int, step: int) -> torch.Tensor:
        trainer = SimpleNamespace(global_rank=rank, global_step=step, accumulate_grad_batches=1)
        with step_global_rng(trainer, 0, 0, "dropout"):
            return torch.nn.functional.dropout(torch.ones(64), 0.5)

    torch.manual_seed(1)
    first = draws(0, 5)
    after = torch.rand(4)
    torch.manual_seed(2)  # another global state: the same draws, and the state goes on as it would have
    assert torch.equal(draws(0, 5), first)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(4), after)
    assert not torch.equal(draws(1, 5), first) and not torch.equal(draws(0, 6), first)


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
