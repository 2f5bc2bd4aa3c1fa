"""save_pretrained / from_pretrained for the LRM: our own format, the released checkpoint, registry names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from vfusion3d_lightning.io import atomic_write
from vfusion3d_lightning.hub import load_state_file, locate_weights
from vfusion3d_lightning.models.lrm.config import LRMConfig
from vfusion3d_lightning.models.lrm.convert import convert_released_lrm, hf_dinov2_to_timm, is_released_state_dict

if TYPE_CHECKING:
    from vfusion3d_lightning.models.lrm.model import LRM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_pretrained(model: "LRM", directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        # the config goes in while the new weights wait beside it: a full disk leaves the old pair whole
        atomic_write(directory / CONFIG_NAME, model.config.save)

    atomic_write(directory / WEIGHTS_NAME, write)
    return directory


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load: every key present, none extra, every shape equal; otherwise one error naming them all."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights from {source} do not fit this model:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}")
        lines.append("  check that the config matches the checkpoint (e.g. LRMConfig.vfusion3d() for the released model)")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=True)


def _unwrap_released(payload: dict, path: Path) -> dict[str, torch.Tensor]:
    if "model_state_dict" in payload:
        return payload["model_state_dict"]
    if all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload
    raise ValueError(
        f"{path} holds {sorted(payload)[:8]}, neither a `model_state_dict` (released VFusion3D checkpoint) nor "
        "a plain state dict"
    )


def load_pretrained(cls: type["LRM"], source: str | Path, config: LRMConfig | None = None,
                    checkpoint_dir: str | Path | None = None) -> "LRM":
    entry, path = locate_weights(source, checkpoint_dir,
                                 "no LRM weights at {path}: give a save_pretrained folder, a weights file, or a "
                                 "registry name (see checkpoints/registry.yaml)")
    if entry is not None:
        if entry.converter == "dinov2_hf":
            raise ValueError(f"{source!r} holds encoder weights only; use LRM.load_encoder_weights({source!r})")
        if entry.converter == "timm":
            raise ValueError(f"{source!r} holds curation feature weights (models.features.DinoFeatures), not an LRM")
        config = config or LRMConfig.preset(entry.config)
    if path.is_dir():
        weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}; it is not a save_pretrained folder")
        if config is None and config_file.is_file():
            config = LRMConfig.load(config_file)
        path = weights
    elif config is None and (path.parent / CONFIG_NAME).is_file() and path.name == WEIGHTS_NAME:
        config = LRMConfig.load(path.parent / CONFIG_NAME)
    state = _unwrap_released(load_state_file(path), path)
    if is_released_state_dict(state):
        state = convert_released_lrm(state)
        config = config or LRMConfig.vfusion3d()
    elif config is None:
        raise ValueError(f"{path} has our parameter names but no {CONFIG_NAME} beside it; pass config=LRMConfig(...)")
    model = cls(config)
    load_into(model, state, str(path))
    return model


def load_encoder_weights(model: "LRM", source: str | Path, checkpoint_dir: str | Path | None = None) -> None:
    """Load DINOv2 weights (transformers or timm names) into the encoder: a file path or a registry name."""
    _, path = locate_weights(
        source, checkpoint_dir,
        "DINOv2 weights not found at {path}. Download facebook/dinov2-base's model.safetensors (or timm's "
        "vit_base_patch14_dinov2.lvd142m) and save it there, or start from random encoder weights.")
    state = load_state_file(path)
    if any(k.startswith("embeddings.") for k in state):
        state = hf_dinov2_to_timm(state)
    load_into(model.encoder.vit, state, str(path))
