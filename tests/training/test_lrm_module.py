"""`vfusion3d-lightning fit --config configs/lrm/tiny.yaml` on procedural shards: stages, LR restart, camera
noise, checkpoints that resume, export."""

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
from vfusion3d_lightning.cli import main
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.training import LRMModule
from vfusion3d_lightning.training.lightning_cli import lightning_cli
from vfusion3d_lightning.training.losses import build_lpips
from vfusion3d_lightning.training.schedules import WarmupCosineRestarts

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "lrm" / "tiny.yaml")
STEPS_PER_EPOCH = 4  # tiny.yaml: 8 samples per epoch, batch 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory, procedural_shards):
    return procedural_shards(tmp_path_factory.mktemp("lrm_data"), 8, seed=5, views="random32", resolution=48)


def args(shards: str, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", TINY, "--data.init_args.train_shards", shards, "--data.init_args.val_shards", shards,
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *extra]


def metrics(root: Path) -> list[dict[str, float]]:
    """The metrics of the newest run under `root`."""
    path = max(root.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    with open(path) as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle)]


def per_step(rows, key):
    return {int(r["step"]): r[key] for r in rows if key in r}


class CrashAt(L.Callback):
    """Simulates a killed job: raises when the given step is about to run."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class CameraProbe(L.Callback):
    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(batch["source_camera"].clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch["source_camera"].clone())


def test_tiny_fit_switches_stages_restarts_the_lr_and_resumes_exactly(shards, tmp_path):
    full = tmp_path / "full"
    assert main(args(shards, full)) == 0
    rows = metrics(full)
    # stages: 24 px for epochs 0-1, 32 for 2-3, 48 for 4-5
    sizes = per_step(rows, "train/render_size")
    assert [sizes[s] for s in range(24)] == [24] * 8 + [32] * 8 + [48] * 8
    lr = per_step(rows, "train/lr")
    assert sorted(lr) == list(range(24))
    # warm-up over 4 steps, cosine down to the end of the 32 stage, back to 4e-4 at its end (epoch 4)
    assert lr[0] < lr[1] < lr[2] < lr[3] and lr[0] == pytest.approx(4e-4 / 4, rel=0.02)
    restart = 4 * STEPS_PER_EPOCH
    assert lr[restart - 1] < 0.05 * 4e-4 and lr[restart] == pytest.approx(4e-4)
    assert all(lr[s] > lr[s + 1] for s in range(restart, 23))
    expected = WarmupCosineRestarts(torch.optim.SGD([torch.zeros(1)], lr=4e-4), 24, 4, [restart])
    assert [lr[s] for s in range(24)] == pytest.approx([4e-4 * expected.factor(s) for s in range(24)], rel=1e-5)
    assert {"val/psnr", "val/ssim", "val/lpips"} <= set().union(*rows)
    turntables = sorted(full.glob("lightning_logs/version_*/turntables/*.png"))
    assert len(turntables) == 3  # validation after epochs 1, 3, 5

    # a job killed in the middle of epoch 2 resumes at the same step, stage and LR
    crashed = tmp_path / "crashed"
    cli = lightning_cli(args(shards, crashed)[1:], run=False)
    probe = CameraProbe()
    cli.trainer.callbacks.extend([CrashAt(10), probe])
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.trainer.fit(cli.model, cli.datamodule)
    (last,) = crashed.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 10
    assert main(args(shards, crashed, "--ckpt_path", str(last))) == 0
    resumed = metrics(crashed)
    resumed_lr = per_step([r for r in resumed if r["step"] >= 10], "train/lr")
    assert sorted(resumed_lr) == list(range(10, 24))
    assert [resumed_lr[s] for s in range(10, 24)] == pytest.approx([lr[s] for s in range(10, 24)], rel=1e-6)
    resumed_sizes = per_step([r for r in resumed if r["step"] >= 10], "train/render_size")
    assert [resumed_sizes[s] for s in range(10, 24)] == [sizes[s] for s in range(10, 24)]

    # camera noise in training steps only
    canonical = canonical_source_camera(2)
    assert probe.train and all(0 < (c - canonical).abs().max() <= 0.02 for c in probe.train)
    assert probe.val and all(torch.equal(c, canonical) for c in probe.val)


def test_checkpoints_export_and_restart_from_pretrained(shards, tmp_path):
    root = tmp_path / "run"
    assert main(args(shards, root, "--trainer.max_epochs", "1")) == 0
    (last,) = root.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert saved and all(k.startswith("model.") for k in saved)  # the frozen LPIPS judge is rebuilt, not saved
    module = LRMModule.load_from_checkpoint(last, weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(module.lpips.state_dict().values(),
                                                 build_lpips(random_backbone=True).state_dict().values()))
    export = module.export(tmp_path / "export")
    loaded = LRM.from_pretrained(export)
    for name, value in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # a new run starts from that checkpoint's weights (the fine-tuning path)
    fine = LRMModule(network=module.model.config, pretrained=str(last), lpips_random_backbone=True)
    assert all(torch.equal(a, b) for a, b in zip(fine.model.state_dict().values(), module.model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no LRM weights"):
        LRMModule(network=module.model.config, pretrained=str(tmp_path / "missing"), lpips_random_backbone=True)


def test_schedule_factor_by_hand():
    schedule = WarmupCosineRestarts(torch.optim.SGD([torch.zeros(1)], lr=1.0), total_steps=100, warmup_steps=10,
                                    restart_steps=[40], min_lr_ratio=0.1)
    assert schedule.factor(0) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0))))
    assert schedule.factor(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 40)))
    assert schedule.factor(20) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the first cycle
    assert schedule.factor(40) == pytest.approx(1.0)  # the restart
    assert schedule.factor(70) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule.factor(99) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 59 / 60)))


def test_checkpointing_choices_and_compiled_network_keep_names_and_values():
    tiny = LRMConfig.from_name("tiny")
    network = LRMModule(network=tiny, lpips_random_backbone=True, gradient_checkpointing="network").model
    assert network.transformer.gradient_checkpointing and network.encoder.gradient_checkpointing
    assert not network.renderer.gradient_checkpointing
    every = LRMModule(network=tiny, lpips_random_backbone=True, gradient_checkpointing=True).model
    assert every.renderer.gradient_checkpointing and every.transformer.gradient_checkpointing
    partly = LRMModule(network=tiny, lpips_random_backbone=True, gradient_checkpointing="network",
                       recompute_blocks=1).model
    assert partly.transformer.recompute_blocks == 1 and partly.encoder.gradient_checkpointing
    with pytest.raises(ValueError, match="recompute_blocks.*needs checkpointing on: set gradient_checkpointing"):
        LRMModule(network=tiny, lpips_random_backbone=True, recompute_blocks=1)
    with pytest.raises(ValueError,
                       match="gradient_checkpointing must be true, false, 'network' or 'selective', got 'renderer'"):
        LRMModule(network=tiny, lpips_random_backbone=True, gradient_checkpointing="renderer")

    torch.manual_seed(0)
    eager = LRMModule(network=tiny, lpips_random_backbone=True)
    torch.manual_seed(0)
    compiled = LRMModule(network=tiny, lpips_random_backbone=True, compile_network=True)
    blocks = [*compiled.model.encoder.vit.blocks, *compiled.model.transformer.blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)  # each block compiled, checkpointed apart
    # checkpoints of a compiled run load into an eager module and back
    assert list(compiled.state_dict()) == list(eager.state_dict())
    size = eager.model.config.encoder_img_size
    image, camera = torch.rand(1, 3, size, size), canonical_source_camera(1)
    with torch.no_grad():
        torch.testing.assert_close(compiled.model(image, camera), eager.model(image, camera), atol=1e-4, rtol=1e-4)


def test_a_fused_optimizer_clips_gradients_under_bf16(shards, tmp_path):
    # Lightning's mixed-precision plugin raises for a fused optimizer with gradient_clip_val (tiny.yaml: 1.0)
    root = tmp_path / "fused"
    assert main(args(shards, root, "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "2",
                     "--model.init_args.fused_optimizer", "true")) == 0
    assert max(per_step(metrics(root), "train/loss")) == 1

    torch.manual_seed(0)
    module = LRMModule(network=LRMConfig.from_name("tiny"), lpips_random_backbone=True)
    params = list(module.model.parameters())
    optimizer = torch.optim.AdamW(params, fused=True)
    for algorithm, check in (("norm", lambda: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))),
                             ("value", lambda: max(p.grad.abs().max() for p in params))):
        for p in params:
            p.grad = torch.randn_like(p) * 10
        module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
        assert check() == pytest.approx(0.5, rel=1e-4), algorithm


class _Trainer:
    """What the module's draws read of a trainer: global rank, global step, accumulated batches."""

    def __init__(self, rank=0, step=0, accumulate=1):
        self.global_rank, self.global_step, self.accumulate_grad_batches = rank, step, accumulate


def _module_at(trainer, **kwargs):
    torch.manual_seed(0)
    module = LRMModule(network=LRMConfig.from_name("tiny"), lpips_random_backbone=True, **kwargs)
    module._trainer = trainer
    return module


def test_patches_and_sample_jitter_differ_by_rank_and_micro_batch_and_repeat_on_resume(monkeypatch):
    # rank 1 or the second of two accumulated micro-batches of step 5 draws its own patch; the same (rank, step,
    # micro-batch) draws the same whatever the global RNG holds (a resumed run, another process)
    patches = {}
    for rank, step, batch_idx in [(0, 5, 10), (1, 5, 10), (0, 5, 11), (0, 6, 12)]:
        module = _module_at(_Trainer(rank, step, accumulate=2), patch_size=16)  # global RNG seeded alike
        patches[rank, step, batch_idx] = [module._patch(128, batch_idx) for _ in range(2)]
    draws = [p[0] for p in patches.values()]
    assert len(set(draws)) == len(draws), patches  # ranks, micro-batches and steps apart
    assert all(p[0] == p[1] for p in patches.values())  # the same draw again
    fresh = _module_at(_Trainer(1, 5, accumulate=2), patch_size=16)
    torch.rand(100)  # a resumed run's global RNG is elsewhere
    assert fresh._patch(128, 10) == patches[1, 5, 10][0]
    assert fresh._patch(128, 12) == patches[1, 5, 10][0]  # batch 12 is the first micro-batch of its step too
    assert fresh._patch(16, 10) == (0, 0, 16)  # a patch the size of the render has one place

    # the renderer's sample jitter follows the same rule (patch = render here, so only the jitter varies), and the
    # training step leaves the global RNG alone
    size = LRMConfig.from_name("tiny").encoder_img_size
    generator = torch.Generator().manual_seed(3)
    batch = {"input_image": torch.rand(1, 3, size, size, generator=generator),
             "source_camera": canonical_source_camera(1), "render_cameras": turntable_cameras(2)[None],
             "target_images": torch.rand(1, 2, 3, 8, 8, generator=generator),
             "target_masks": (torch.rand(1, 2, 1, 8, 8, generator=generator) > 0.5).float()}

    def loss(rank, step, batch_idx):
        module = _module_at(_Trainer(rank, step, accumulate=2), render_size=8, patch_size=8, lpips_weight=0.0,
                            l2_weight=1.0)
        monkeypatch.setattr(module, "log", lambda *a, **k: None)
        monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
        monkeypatch.setattr(module, "optimizers", lambda: torch.optim.SGD(module.parameters(), lr=1.0))
        module.render_size = 8
        state = torch.get_rng_state()
        with torch.no_grad():
            value = module.training_step(batch, batch_idx).item()
        assert torch.equal(torch.get_rng_state(), state)
        return value

    first = loss(0, 5, 10)
    assert loss(0, 5, 10) == first
    assert loss(1, 5, 10) != first and loss(0, 5, 11) != first and loss(0, 6, 10) != first
