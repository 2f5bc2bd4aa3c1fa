"""LoRA fine-tuning of the LRM (peft): only adapters train, merging keeps the outputs, adapters save and load alone,
and `fit` -> `export` writes a folder that from_pretrained loads, with its model card; `fit` resumes."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
from vfusion3d_lightning.cli import main
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.lora import LoraOptions, add_lora, has_lora, load_lora, merge_lora, save_lora

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "configs" / "lrm" / "network" / "tiny.yaml").read_text())


def tiny_lrm(seed: int = 0) -> LRM:
    torch.manual_seed(seed)
    return LRM(LRMConfig.from_dict(TINY)).eval()


def planes_of(model: LRM) -> torch.Tensor:
    torch.manual_seed(1)
    image = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        return model(image, canonical_source_camera(2))


def perturb_adapters(model: LRM) -> None:
    """Adapters as after training (peft starts lora_B at zero, which would make every check pass vacuously)."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)


def test_only_the_adapters_train_and_merging_keeps_the_outputs():
    model = tiny_lrm()
    base = planes_of(model)
    total = sum(p.numel() for p in model.parameters())
    add_lora(model, LoraOptions(rank=4))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # 2 blocks x (4 cross-attention + 2 self-attention + 2 MLP layers), each an A and a B matrix
    assert len(trainable) == 2 * 8 * 2
    dim = TINY["transformer_dim"]
    assert "transformer.blocks.1.mlp.fc1.lora_A.default.weight" in trainable
    assert dict(model.named_parameters())["transformer.blocks.0.self_attn.to_qkv.lora_B.default.weight"].shape == (
        3 * dim, 4)
    assert torch.equal(planes_of(model), base)  # lora_B starts at zero
    perturb_adapters(model)
    adapted = planes_of(model)
    assert (adapted - base).abs().max() > 1e-3
    merge_lora(model)
    assert not has_lora(model)
    assert sum(p.numel() for p in model.parameters()) == total
    torch.testing.assert_close(planes_of(model), adapted, atol=1e-5, rtol=1e-5)


def test_adapters_save_alone_and_load_onto_the_base_weights(tmp_path):
    model = add_lora(tiny_lrm(), LoraOptions(rank=2, alpha=4.0))
    perturb_adapters(model)
    adapted = planes_of(model)
    folder = save_lora(model, tmp_path / "adapter", LoraOptions(rank=2, alpha=4.0), base_model="tiny")
    names = json.loads((folder / "adapter_config.json").read_text())
    assert names["r"] == 2 and names["lora_alpha"] == 4.0 and names["base_model_name_or_path"] == "tiny"
    from safetensors.torch import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # the adapters alone: no base weight
    reloaded = load_lora(tiny_lrm(), folder)
    torch.testing.assert_close(planes_of(reloaded), adapted)
    other_base = load_lora(tiny_lrm(seed=3), folder)
    assert not torch.allclose(planes_of(other_base), adapted)  # adapters are deltas on their own base


def test_bad_targets_and_rank_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="match no linear layer.*named like"):
        add_lora(tiny_lrm(), LoraOptions(targets=r"decoder\.nothing"))
    with pytest.raises(ValueError, match="rank must be at least 1"):
        LoraOptions(rank=0)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(tiny_lrm(), Path("/nonexistent/adapter"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, procedural_shards):
    return procedural_shards(tmp_path_factory.mktemp("lora_data"), 8, seed=7, views="random32", resolution=48)


def fit_args(shards: str, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "lrm" / "tiny.yaml"), "--data.init_args.train_shards", shards,
            "--data.init_args.val_shards", shards, "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.logger.class_path",
            "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(root), *extra]


def test_fit_with_lora_resumes_and_exports_a_merged_folder_with_its_card(shards, tmp_path):
    root = tmp_path / "run"
    lora = ["--model.init_args.lora.rank", "4", "--trainer.max_epochs", "1"]
    assert main(fit_args(shards, root, *lora)) == 0
    checkpoint = next(root.rglob("last.ckpt"))
    stored = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert stored["hyper_parameters"]["lora"]["rank"] == 4
    assert stored["datamodule_hyper_parameters"]["train_shards"] == shards
    # only adapters moved: a frozen weight is the initial one, an adapter's B is no longer zero
    state = stored["state_dict"]
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in state.items())
    metrics = (next(root.rglob("metrics.csv"))).read_text()
    assert "parameters/trainable" in metrics
    # resume: one more epoch from the checkpoint
    assert main(fit_args(shards, root, *lora[:2], "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoint))) == 0
    newest = max(root.rglob("last.ckpt"), key=lambda path: path.stat().st_mtime_ns)
    resumed = torch.load(newest, weights_only=True, map_location="cpu")
    assert resumed["global_step"] > stored["global_step"]

    folder = tmp_path / "export"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder)]) == 0
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    card = (folder / "README.md").read_text()
    assert "LoRA adapters of rank 4" in card and shards in card
    exported = LRM.from_pretrained(folder).eval()
    assert not has_lora(exported)
    # the exported weights compute what the checkpoint's adapted network computes
    adapted = add_lora(LRM(LRMConfig.from_dict(stored["hyper_parameters"]["network"])), LoraOptions(rank=4))
    adapted.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    torch.testing.assert_close(planes_of(exported), planes_of(adapted.eval()), atol=1e-5, rtol=1e-5)
    # from_pretrained reads the LoRA checkpoint itself too, merged
    torch.testing.assert_close(planes_of(LRM.from_pretrained(checkpoint).eval()), planes_of(exported))
    cameras = turntable_cameras(2, 32)
    assert exported.render(planes_of(exported), cameras[None].expand(2, -1, -1), 8).rgb.isfinite().all()


def test_freeze_encoder_trains_all_but_the_encoder(shards, tmp_path):
    from vfusion3d_lightning.training import LRMModule

    module = LRMModule(network=TINY, freeze_encoder=True, lpips_random_backbone=True)
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in module.model.named_parameters() if n.startswith("encoder.")}
    counts = module.parameter_counts()
    encoder = sum(p.numel() for p in module.model.encoder.parameters())
    assert counts["total"] - counts["trainable"] == encoder
    assert counts["optimizer_state_bytes"] == 2 * 4 * counts["trainable"]
