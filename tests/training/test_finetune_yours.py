"""The README's "fine-tune on your own 3D assets" recipe at the tiny scale on a CPU: a tiny LRM trained on procedural
assets, fine-tuned on renders of real meshes (the package's scanned and modelled objects), scores better on held-out
views of those meshes than before the fine-tune; a full fine-tune and a LoRA one both, each exported and evaluated
through the commands a user runs."""

import csv
from pathlib import Path

import pytest
import yaml

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data.eval_sets import install_real

ROOT = Path(__file__).resolve().parents[2]
REAL = ["bunny", "teapot", "ant", "nut"]  # the bundled objects: no registry needed


def fit_config(tmp: Path, name: str, train: str, val: str, steps: int, **model) -> Path:
    """configs/lrm/quickstart_finetune_3d.yaml at `steps` steps of one epoch, written whole into `tmp`."""
    config = yaml.safe_load((ROOT / "configs" / "lrm" / "quickstart_finetune_3d.yaml").read_text())
    config["model"]["init_args"].update(
        network=yaml.safe_load((ROOT / "configs" / "lrm" / "network" / "quickstart.yaml").read_text()),
        **{"pretrained": None, **model})
    config["trainer"].update(max_epochs=1, check_val_every_n_epoch=1, default_root_dir=str(tmp / name),
                             enable_progress_bar=False)
    config["trainer"]["callbacks"][0]["init_args"] = {"resolutions": [16], "epochs": [1]}
    config["data"]["init_args"].update(train_shards=train, val_shards=val, samples_per_epoch=4 * steps,
                                       num_workers=0)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path) -> Path:
    assert main(["fit", "--config", str(config)]) == 0
    return max(config.parent.joinpath(config.stem).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime_ns)


def held_out_scores(folder: Path, name: str) -> dict[str, float]:
    rows = list(csv.DictReader((folder / name / "objects.csv").open()))
    assert len(rows) == len(REAL)
    return {key: sum(float(r[key]) for r in rows) / len(rows) for key in ("psnr", "opacity_iou")}


@pytest.mark.slow
def test_fine_tuning_on_real_meshes_improves_their_held_out_views_full_and_lora(tmp_path, procedural_shards):
    procedural = procedural_shards(tmp_path / "procedural", 24, seed=11, views="random32", resolution=32,
                                   style="solid", shard_size=8)
    base = fit(fit_config(tmp_path, "base", procedural, procedural, steps=250))
    install_real(tmp_path / "real", REAL, progress=False)
    render = ["render", "--assets", str(tmp_path / "real"), "--resolution", "32", "--workers", "1",
              "--progress", "false"]
    assert main([*render, "--out", str(tmp_path / "real_train"), "--views", "random32"]) == 0
    assert main([*render, "--out", str(tmp_path / "real_held_out"), "--views", "uniform32", "--seed", "1"]) == 0
    train, held_out = str(tmp_path / "real_train" / "shard-*.tar"), str(tmp_path / "real_held_out" / "shard-*.tar")

    full = fit(fit_config(tmp_path, "full", train, held_out, steps=120, pretrained=str(base), lr=1e-3))
    # adapters take a larger LR than full weights, as LoRA recipes do
    lora = fit(fit_config(tmp_path, "lora", train, held_out, steps=120, pretrained=str(base), lr=1e-2,
                          lora={"rank": 16, "alpha": 16.0}))
    for name, checkpoint in (("full", full), ("lora", lora)):
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / f"{name}_export")]) == 0
    assert (tmp_path / "lora_export" / "adapter" / "adapter_model.safetensors").is_file()
    assert "LoRA adapters of rank 16" in (tmp_path / "lora_export" / "README.md").read_text()
    assert "real_train" in (tmp_path / "full_export" / "README.md").read_text()

    scores = tmp_path / "scores"
    assert main(["evaluate", "--checkpoint", f"[{base},{tmp_path / 'full_export'},{tmp_path / 'lora_export'}]",
                 "--shards", held_out, "--out", str(scores), "--clip", "none", "--lpips_random_backbone", "true",
                 "--input_size", "56", "--geometry", "false", "--report", "false", "--device", "cpu"]) == 0
    names = sorted(p.name for p in scores.iterdir() if (p / "objects.csv").is_file())
    before = held_out_scores(scores, next(n for n in names if n.startswith("last")))
    for name in ("full_export", "lora_export"):
        after = held_out_scores(scores, name)
        assert after["psnr"] > before["psnr"] + 0.3, (name, before, after)
        assert after["opacity_iou"] > before["opacity_iou"] + 0.05, (name, before, after)
