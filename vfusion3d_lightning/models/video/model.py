"""VideoDiffusionModel: a diffusers video denoiser with its VAE, condition encoders and scheduler, conditioned
the way the public pipelines condition it, so that training and sampling share one code path.

Supported backbones (shared/spec/video_backbones.md):
- `UNetSpatioTemporalConditionModel` (Stable Video Diffusion): CLIP image embedding as the cross-attention
  context, the (noise-augmented) first-frame latent concatenated on channels, and added time ids
  (fps - 1, motion bucket, noise augmentation), as in diffusers' StableVideoDiffusionPipeline.
- `I2VGenXLUNet` (I2VGen-XL): CLIP text embeddings as context, the CLIP image embedding, and first-frame
  latents followed by frame-position masks, as in diffusers' I2VGenXLPipeline.
Without a VAE (small from-scratch models), diffusion runs on pixels in [-1, 1].
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfusion3d_lightning.models.video.architectures import ARCHITECTURES, char_tokenizer

log = logging.getLogger(__name__)

SUPPORTED_UNETS = ("UNetSpatioTemporalConditionModel", "I2VGenXLUNet")
HUB_IDS = {
    "UNetSpatioTemporalConditionModel": "stabilityai/stable-video-diffusion-img2vid-xt",
    "I2VGenXLUNet": "ali-vilab/i2vgen-xl",
}
COMPONENT_LIBRARY = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers",
                     "image_encoder": "transformers", "text_encoder": "transformers", "tokenizer": "transformers"}
SETTINGS_FILE = "vfusion3d_video.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Conditioning:
    """Micro-conditions, fixed for a model: training and sampling must use the same values."""

    fps: int = 7  # SVD receives fps - 1, as its reference pipeline does; I2VGen-XL receives fps
    motion_bucket_id: int = 127  # SVD only
    noise_aug_strength: float = 0.02  # SVD only: noise added to the condition image before encoding


@dataclass
class Conditions:
    """Per-sample conditions for the denoiser: UNet keyword arguments and, for SVD, channels to concatenate."""

    unet_kwargs: dict[str, Tensor] = field(default_factory=dict)
    concat: Tensor | None = None

    def cat(self, other: "Conditions") -> "Conditions":
        """Both batches in one (classifier-free guidance runs the unconditional and conditional together)."""
        kwargs = {k: torch.cat([v, other.unet_kwargs[k]]) for k, v in self.unet_kwargs.items()}
        concat = None if self.concat is None else torch.cat([self.concat, other.concat])
        return Conditions(kwargs, concat)


def _component_class(library: str, name: str):
    return getattr(importlib.import_module(library), name)


def _build_component(library: str, class_name: str, config: dict):
    cls = _component_class(library, class_name)
    if library == "transformers":
        return cls(cls.config_class(**config))
    if class_name.endswith("Scheduler"):
        return cls.from_config(config)
    return cls(**config)


def resolve_pretrained_folder(source: str | Path) -> Path:
    """A local diffusers folder, or a hub id already in the local Hugging Face cache (never downloaded)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (model_index.json missing)")
        return path
    if "/" in str(source) and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(source), local_files_only=True))
        except Exception:
            pass
    hub_ids = ", ".join(HUB_IDS.values())
    raise FileNotFoundError(
        f"video model {source!r} is not a folder, a cached hub id or one of the architectures "
        f"{sorted(ARCHITECTURES)}. Fetch a public model ({hub_ids}) on a machine with network access, e.g. "
        f"`hf download {HUB_IDS['UNetSpatioTemporalConditionModel']} --local-dir "
        f"checkpoints/stable-video-diffusion-img2vid-xt`, copy it here and pass that folder")


class VideoDiffusionModel(nn.Module):
    """The denoiser and everything it needs. Frames are (B, F, 3, H, W) in [0, 1]; latents (B, F, C, h, w)."""

    def __init__(self, unet: nn.Module, scheduler, image_encoder: nn.Module, vae: nn.Module | None = None,
                 text_encoder: nn.Module | None = None, tokenizer=None, conditioning: Conditioning | None = None):
        super().__init__()
        kind = type(unet).__name__
        if kind not in SUPPORTED_UNETS:
            raise ValueError(f"unsupported video UNet {kind}; supported: {SUPPORTED_UNETS}")
        if kind == "I2VGenXLUNet" and (text_encoder is None or tokenizer is None):
            raise ValueError("I2VGenXLUNet needs a text_encoder and a tokenizer")
        self.unet, self.vae, self.image_encoder, self.text_encoder = unet, vae, image_encoder, text_encoder
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.conditioning = conditioning or Conditioning()
        for frozen in (vae, image_encoder, text_encoder):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, architecture: str, conditioning: Conditioning | None = None) -> "VideoDiffusionModel":
        """Random weights in one of ARCHITECTURES (see architectures.py)."""
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown video architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
        parts = {name: _build_component(COMPONENT_LIBRARY[name], cls_name, config)
                 for name, (cls_name, config) in ARCHITECTURES[architecture].items()}
        if "text_encoder" in parts:
            parts["tokenizer"] = char_tokenizer()
        return cls(conditioning=conditioning, **parts)

    @classmethod
    def from_pretrained(cls, source: str | Path, variant: str | None = None,
                        conditioning: Conditioning | None = None) -> "VideoDiffusionModel":
        """Load a diffusers pipeline folder (a public video model, or one written by `save_pretrained`)."""
        folder = resolve_pretrained_folder(source)
        index = json.loads((folder / "model_index.json").read_text())
        parts = {}
        for name in COMPONENT_LIBRARY:
            if name not in index or index[name] is None or index[name][1] is None:
                continue
            library, class_name = index[name]
            kwargs = {"variant": variant} if variant and name in ("unet", "vae", "image_encoder", "text_encoder") else {}
            parts[name] = _component_class(library, class_name).from_pretrained(folder / name, **kwargs)
        settings = folder / SETTINGS_FILE
        if conditioning is None and settings.is_file():
            conditioning = Conditioning(**json.loads(settings.read_text())["conditioning"])
        missing = {"unet", "scheduler", "image_encoder"} - set(parts)
        if missing:
            raise FileNotFoundError(f"{folder} has no {sorted(missing)}: not an image-conditioned video model")
        return cls(conditioning=conditioning, **parts)

    @classmethod
    def load(cls, source: str | Path, variant: str | None = None,
             conditioning: Conditioning | None = None) -> "VideoDiffusionModel":
        """An architecture name gives random weights; anything else loads pretrained weights."""
        if str(source) in ARCHITECTURES:
            return cls.build(str(source), conditioning)
        return cls.from_pretrained(source, variant, conditioning)

    def save_pretrained(self, folder: str | Path) -> Path:
        """A diffusers-layout folder (model_index.json and one subfolder per component) plus our settings."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": "VFusion3DOrbitVideoPipeline", "_diffusers_version": _diffusers_version()}
        for name in COMPONENT_LIBRARY:
            part = getattr(self, name)
            if part is None:
                continue
            part.save_pretrained(folder / name)
            index[name] = [COMPONENT_LIBRARY[name], type(part).__name__]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        (folder / SETTINGS_FILE).write_text(json.dumps({"conditioning": asdict(self.conditioning)}, indent=2))
        return folder

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> str:
        return type(self.unet).__name__

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent, times the UNet's downsampling: frame sizes must be multiples of this."""
        vae = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        return vae * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_frames(self, num_frames: int, height: int, width: int) -> None:
        factor = self.spatial_factor
        if height % factor or width % factor:
            raise ValueError(f"frames of {width}x{height} do not divide into this {self.kind}'s latent grid; "
                             f"use sizes that are multiples of {factor}")
        if num_frames < 2:
            raise ValueError(f"a video needs at least 2 frames, got {num_frames}")

    # ------------------------------------------------------------------ encoders

    def _vae_input(self, images: Tensor) -> Tensor:
        return (images * 2 - 1).to(self.vae.dtype if self.vae is not None else images.dtype)

    @torch.no_grad()
    def encode_frames(self, frames: Tensor, generator: torch.Generator | None = None, chunk: int = 16) -> Tensor:
        """(B, F, 3, H, W) in [0, 1] -> scaled latents (B, F, C, h, w), sampled from the VAE posterior."""
        flat = frames.flatten(0, 1)
        if self.vae is None:
            return (flat * 2 - 1).unflatten(0, frames.shape[:2])
        latents = [self.vae.encode(self._vae_input(part)).latent_dist.sample(generator)
                   for part in flat.split(chunk)]
        return (torch.cat(latents) * self.latent_scale).float().unflatten(0, frames.shape[:2])

    @torch.no_grad()
    def decode_latents(self, latents: Tensor, chunk: int = 8) -> Tensor:
        """Scaled latents (B, F, C, h, w) -> frames (B, F, 3, H, W) in [0, 1]."""
        flat = latents.flatten(0, 1) / self.latent_scale
        if self.vae is None:
            images = flat
        else:
            temporal = self.kind == "UNetSpatioTemporalConditionModel" and "num_frames" in _decode_arguments(self.vae)
            parts = []
            for part in flat.split(chunk):
                kwargs = {"num_frames": part.shape[0]} if temporal else {}
                parts.append(self.vae.decode(part.to(self.vae.dtype), **kwargs).sample.float())
            images = torch.cat(parts)
        return ((images + 1) / 2).clamp(0, 1).unflatten(0, latents.shape[:2])

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> CLIP image embeddings (B, 1, D)."""
        size = self.image_encoder.config.image_size
        resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                                align_corners=False).clamp(0, 1)
        pixels = ((resized - self.clip_mean) / self.clip_std).to(self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixels).image_embeds.unsqueeze(1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        """Prompts -> CLIP text hidden states (B, L, D), padded to the tokenizer's maximum length."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.clip_mean.device)).last_hidden_state

    def conditions(self, images: Tensor, prompts: list[str] | None, num_frames: int,
                   generators: list[torch.Generator] | None = None, drop: Tensor | None = None) -> Conditions:
        """Conditions from first frames (B, 3, H, W) in [0, 1] and prompts. `drop` (B,) bool replaces a sample's
        conditions by the unconditional ones that classifier-free guidance uses."""
        batch = images.shape[0]
        device = images.device
        noise = _randn_like_per_sample(images, generators)
        image_embeddings = self.image_embeddings(images).float()
        keep = None if drop is None else (~drop).float().to(device)
        if keep is not None:
            image_embeddings = image_embeddings * keep.view(-1, 1, 1)
        if self.kind == "UNetSpatioTemporalConditionModel":
            aug = self.conditioning.noise_aug_strength
            with torch.no_grad():
                augmented = images * 2 - 1 + aug * noise
                if self.vae is None:
                    first = augmented
                else:  # the posterior mode, unscaled, as the SVD pipeline does
                    first = self.vae.encode(augmented.to(self.vae.dtype)).latent_dist.mode().float()
            if keep is not None:
                first = first * keep.view(-1, 1, 1, 1)
            time_ids = torch.tensor([self.conditioning.fps - 1, self.conditioning.motion_bucket_id, aug],
                                    device=device, dtype=torch.float32).expand(batch, 3)
            return Conditions({"encoder_hidden_states": image_embeddings, "added_time_ids": time_ids},
                              concat=first.unsqueeze(1).expand(-1, num_frames, -1, -1, -1))
        # I2VGen-XL: text context, image embedding, first-frame latents and frame-position masks
        prompts = list(prompts) if prompts is not None else [""] * batch
        if drop is not None:
            prompts = ["" if dropped else prompt for prompt, dropped in zip(prompts, drop.tolist())]
        text = self.text_embeddings(prompts).float()
        with torch.no_grad():
            posterior = self.vae.encode(self._vae_input(images)).latent_dist
            first = (posterior.mean + posterior.std * _randn_like_per_sample(posterior.mean, generators)).float()
        first = (first * self.latent_scale).unsqueeze(2)
        positions = torch.arange(1, num_frames, device=device, dtype=first.dtype) / max(1, num_frames - 1)
        masks = positions.view(1, 1, -1, 1, 1).expand(batch, first.shape[1], -1, *first.shape[-2:])
        fps = torch.full((batch,), self.conditioning.fps, device=device, dtype=torch.long)
        return Conditions({"encoder_hidden_states": text, "image_embeddings": image_embeddings,
                           "image_latents": torch.cat([first, masks], dim=2), "fps": fps})

    def unconditional(self, images: Tensor, num_frames: int, generators=None) -> Conditions:
        return self.conditions(images, None, num_frames, generators,
                               drop=torch.ones(images.shape[0], dtype=torch.bool, device=images.device))

    # ------------------------------------------------------------------ denoiser

    def forward(self, model_input: Tensor, timesteps: Tensor, cond: Conditions) -> Tensor:
        """The UNet's raw output for scaled noisy latents (B, F, C, h, w) at timesteps (B,)."""
        dtype = model_input.dtype
        kwargs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.unet_kwargs.items()}
        if self.kind == "UNetSpatioTemporalConditionModel":
            sample = torch.cat([model_input, cond.concat.to(dtype)], dim=2)
            return self.unet(sample, timesteps, **kwargs).sample
        out = self.unet(model_input.transpose(1, 2), timesteps, **kwargs).sample
        return out.transpose(1, 2)

    def train(self, mode: bool = True) -> "VideoDiffusionModel":
        """Only the denoiser changes mode: the frozen encoders and VAE stay in eval mode."""
        super().train(mode)
        for frozen in (self.vae, self.image_encoder, self.text_encoder):
            if frozen is not None:
                frozen.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()


def _randn_like_per_sample(reference: Tensor, generators: list[torch.Generator] | None) -> Tensor:
    """Gaussian noise shaped like `reference`, drawn per sample from its own generator when given (so a
    sample's result does not depend on the batch it was in)."""
    if generators is None:
        return torch.randn_like(reference, dtype=torch.float32)
    return torch.stack([torch.randn(reference.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                        for g in generators]).to(reference.device)


def _decode_arguments(vae: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(vae.decode).parameters)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
