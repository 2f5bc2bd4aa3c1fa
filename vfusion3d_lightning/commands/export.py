"""`vfusion3d-lightning export`: an LRM training checkpoint -> a folder that from_pretrained, infer and app load."""

from __future__ import annotations

from pathlib import Path

from vfusion3d_lightning import hub
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.training.lrm import ADAPTER_FOLDER, export_lrm


def export(checkpoint: Path, out: Path) -> dict:
    """Write the LRM of a training checkpoint (a Lightning .ckpt of LRMModule, as `fit` writes) as a
    save_pretrained folder: model.safetensors, config.json and a README.md model card recording the run's start,
    data and recipe. `LRM.from_pretrained`, `infer --checkpoint`, `app` and `evaluate` load it. A LoRA fine-tune's
    adapters are merged into the weights and also saved alone in OUT/adapter (peft's files).

    Args:
        checkpoint: the .ckpt file (e.g. lightning_logs/version_0/checkpoints/last.ckpt); read without running
            code from it.
        out: the folder to write; its model files are replaced, any other file in it is kept.
    """
    found = hub.read_lightning_checkpoint(checkpoint, "LRMModule", ["network"], fit_config="configs/lrm/tiny.yaml")
    lora = found.hparams.get("lora")
    model = LRM.with_weights(LRMConfig.from_dict(found.hparams["network"]), found.state, checkpoint, lora)
    data = found.raw.get("datamodule_hyper_parameters")
    folder = export_lrm(model, found.hparams, dict(data) if isinstance(data, dict) else {},
                        found.raw.get("global_step"), out)
    parts = ["model.safetensors, config.json, README.md"] + ([f"{ADAPTER_FOLDER}/"] if lora else [])
    print(f"exported {checkpoint} -> {folder} ({', '.join(parts)})")
    return {"folder": str(folder), "lora": bool(lora)}
