"""Sizes of the LRM: one typed dataclass, so LightningCLI can print and override every field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The release's config.json (facebook/vfusion3d on the Hugging Face Hub, the sizes of its `LRMGenerator`) ->
# our fields. Its encoder is named by its transformers hub id; ours is the same network built by timm.
RELEASE_ENCODERS = {  # release encoder_model_name -> (timm name, its token width)
    "facebook/dinov2-small": ("vit_small_patch14_dinov2", 384),
    "facebook/dinov2-base": ("vit_base_patch14_dinov2", 768),
    "facebook/dinov2-large": ("vit_large_patch14_dinov2", 1024),
    "facebook/dinov2-giant": ("vit_giant_patch14_dinov2", 1536),
}
RELEASE_SIZES = ("camera_embed_dim", "transformer_dim", "transformer_layers", "transformer_heads",
                 "triplane_low_res", "triplane_dim")
# keys only a release config.json has: how `load` tells it from ours (ours names `encoder_name`)
RELEASE_MARKERS = frozenset({"encoder_model_name", "encoder_feat_dim", "rendering_samples_per_ray",
                             "triplane_high_res"})


@dataclass
class LRMConfig:
    """Every size and rendering number of the LRM. The named sizes live in `configs/lrm/network/*.yaml` and
    load with `from_name` (`LRMConfig.from_name("vfusion3d")` is the released network); the field defaults only
    fill what a YAML file leaves out."""

    # DINOv2 ViT image encoder, built by timm. The encoder_* sizes override the timm model's own
    # (None keeps it): img_size sets the grid of its position embeddings.
    encoder_name: str = "vit_base_patch14_dinov2"
    encoder_img_size: int | None = None
    encoder_depth: int | None = None
    encoder_embed_dim: int | None = None
    encoder_heads: int | None = None
    # Camera embedder and transformer.
    camera_embed_dim: int = 1024
    transformer_dim: int = 1024
    transformer_layers: int = 16
    transformer_heads: int = 16
    transformer_eps: float = 1e-6
    mlp_ratio: float = 4.0
    # Triplane: tokens form 3 planes of low_res^2, upsampled x2 to `triplane_dim` channels.
    triplane_low_res: int = 32
    triplane_dim: int = 80
    # NeRF decoder MLP on the concatenated features of the three planes.
    decoder_hidden_dim: int = 64
    decoder_layers: int = 4
    # Volume rendering: stratified then importance samples per ray inside the box [-box/2, box/2]^3.
    coarse_samples: int = 64
    importance_samples: int = 64
    box_size: float = 2.0
    white_background: bool = True

    def __post_init__(self) -> None:
        positive = {
            "camera_embed_dim": self.camera_embed_dim,
            "transformer_dim": self.transformer_dim,
            "transformer_layers": self.transformer_layers,
            "transformer_heads": self.transformer_heads,
            "triplane_low_res": self.triplane_low_res,
            "triplane_dim": self.triplane_dim,
            "decoder_hidden_dim": self.decoder_hidden_dim,
            "coarse_samples": self.coarse_samples,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"LRMConfig.{name} must be positive, got {value}")
        if self.transformer_dim % self.transformer_heads:
            raise ValueError(
                f"LRMConfig.transformer_dim ({self.transformer_dim}) must be divisible by "
                f"transformer_heads ({self.transformer_heads})"
            )
        if self.decoder_layers < 2:
            raise ValueError(f"LRMConfig.decoder_layers must be >= 2, got {self.decoder_layers}")
        if self.coarse_samples < 2 or self.importance_samples < 0:
            raise ValueError(
                f"need coarse_samples >= 2 and importance_samples >= 0, got {self.coarse_samples}, "
                f"{self.importance_samples}"
            )

    @property
    def encoder_overrides(self) -> dict[str, int]:
        """The encoder sizes set here, as `timm.create_model` keyword arguments."""
        sizes = {"img_size": self.encoder_img_size, "depth": self.encoder_depth,
                 "embed_dim": self.encoder_embed_dim, "num_heads": self.encoder_heads}
        return {name: value for name, value in sizes.items() if value is not None}

    @property
    def triplane_high_res(self) -> int:
        return 2 * self.triplane_low_res

    @classmethod
    def from_name(cls, name: str) -> "LRMConfig":
        """A shipped network size: `configs/lrm/network/<name>.yaml`, the one home of the named sizes.

        Args:
            name: `vfusion3d` (the released network, 452.1 M parameters), `tiny` (a few layers, for tests and
                CPU demos), or any other file of that folder (`presets.network_names()`).
        """
        from vfusion3d_lightning import presets

        names = presets.network_names()
        if name not in names:
            raise ValueError(f"unknown LRM network {name!r}; shipped sizes (configs/lrm/network/): {names}")
        path = presets.shipped_config(f"lrm/network/{name}")
        values = yaml.safe_load(path.read_text()) or {}
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} is not an LRM network config: {err}") from err

    @classmethod
    def from_release_config(cls, values: dict[str, Any]) -> "LRMConfig":
        """The network a release config.json describes (the Hub repo facebook/vfusion3d: `camera_embed_dim`,
        `transformer_dim`, `transformer_layers`, `transformer_heads`, `triplane_low_res`, `triplane_high_res`
        (= 2 x low res), `triplane_dim`, `encoder_feat_dim`, `encoder_model_name` (a DINOv2 hub id),
        `rendering_samples_per_ray` (half stratified, half importance samples)). Keys of ours may appear too and
        are taken as given (a smaller network's config: `encoder_depth`, `encoder_img_size`...); other keys
        (transformers' metadata: `architectures`, `auto_map`, `model_type`...) are ignored.

        Args:
            values: the parsed config.json.
        """
        values = dict(values)
        name = values.get("encoder_model_name", "facebook/dinov2-base")
        if name not in RELEASE_ENCODERS:
            raise ValueError(f"release config names encoder {name!r}; known: {sorted(RELEASE_ENCODERS)}")
        missing = [key for key in RELEASE_SIZES if key not in values]
        if missing:
            raise ValueError(f"release config lacks {missing}: not a VFusion3D LRM config")
        timm_name, width = RELEASE_ENCODERS[name]
        ours = {f.name for f in dataclasses.fields(cls)}
        fields = {key: values[key] for key in ours if key in values}  # ours first, release sizes override
        fields.update({key: values[key] for key in RELEASE_SIZES})
        fields["encoder_name"] = timm_name
        feat = values.get("encoder_feat_dim", width)
        if feat != width:  # a narrower encoder than the named one (tests): its width is ours to set
            fields.setdefault("encoder_embed_dim", feat)
        if fields.get("encoder_embed_dim", feat) != feat:
            raise ValueError(f"release config: encoder_feat_dim {feat} but encoder_embed_dim "
                             f"{fields['encoder_embed_dim']}")
        high = values.get("triplane_high_res", 2 * values["triplane_low_res"])
        if high != 2 * values["triplane_low_res"]:
            raise ValueError(f"release config: triplane_high_res {high} is not 2 x triplane_low_res "
                             f"{values['triplane_low_res']} (the upsampler doubles it)")
        if "rendering_samples_per_ray" in values:
            fields["coarse_samples"] = fields["importance_samples"] = values["rendering_samples_per_ray"] // 2
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LRMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LRM config fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LRMConfig":
        """A config.json: ours (`save`), or the release's (`from_release_config`), told apart by its keys."""
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(values, dict) or "format" in values:  # our other models' configs record a format
            kind = values.get("format") if isinstance(values, dict) else type(values).__name__
            raise ValueError(f"{path} is not an LRM config ({kind}): give the folder LRM.save_pretrained or "
                             "LRMModule.export wrote")
        try:
            if RELEASE_MARKERS & set(values) and "encoder_name" not in values:
                return cls.from_release_config(values)
            return cls.from_dict(values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path} is not an LRM config: {err}") from err
