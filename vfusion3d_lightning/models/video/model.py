"""VideoDiffusionModel: a diffusers video denoiser with its VAE, condition encoders and scheduler, conditioned
the way the public pipelines condition it, so that training and sampling share one code path.

Supported backbones:
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

from vfusion3d_lightning import hub
from vfusion3d_lightning.io import atomic_write_folder
from vfusion3d_lightning.models.video.architectures import ARCHITECTURES, char_tokenizer
from vfusion3d_lightning.models.video.temporal import temporal_parameter_names

log = logging.getLogger(__name__)

SUPPORTED_UNETS = ("UNetSpatioTemporalConditionModel", "I2VGenXLUNet")
HUB_IDS = {
    "UNetSpatioTemporalConditionModel": "stabilityai/stable-video-diffusion-img2vid-xt",
    "I2VGenXLUNet": "ali-vilab/i2vgen-xl",
}
COMPONENT_LIBRARY = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers",
                     "image_encoder": "transformers", "text_encoder": "transformers", "tokenizer": "transformers"}
SETTINGS_FILE, README_NAME = "vfusion3d_video.json", "README.md"
# what a video model's Hub repo must provide: the diffusers layout's index, configs, tokenizer files and
# safetensors weights of each component (not single-file checkpoints, .bin or ONNX copies beside them)
HUB_FILES = ("model_index.json", SETTINGS_FILE, README_NAME, "*/*.json", "*/*.txt", "*/*.safetensors")
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


def resolve_pretrained_folder(source: str | Path, checkpoint_dir: str | Path | None = None,
                              revision: str | None = None, cache_dir: str | Path | None = None,
                              token: str | bool | None = None) -> Path:
    """The local file or folder a video model loads from: a `.ckpt` or a diffusers folder as given, a Hugging Face
    Hub repo id's snapshot (`hub.hub_snapshot_files`: fetched into the Hugging Face cache unless there or
    offline), or a registry name's folder (`hub.checkpoint_dir()`).

    Args:
        source: a path, a Hub repo id or a registry name.
        checkpoint_dir: where registry names resolve (default: `hub.checkpoint_dir()`).
        revision, cache_dir, token: for a Hub repo id (see `hub.hub_snapshot_files`).
    """
    path = Path(source).expanduser()
    if hub.is_hub_repo_id(source) or (hub.is_registry_name(source) and str(source) in hub.load_registry()):
        _, path = hub.locate_weights(str(source), checkpoint_dir, what="a video model", converters=("diffusers",),
                                     hub_files=HUB_FILES, revision=revision, cache_dir=cache_dir, token=token)
    if path.is_file() and hub.is_lightning_checkpoint(path):
        return path
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (model_index.json missing)")
        return path
    registry = sorted(name for name, entry in hub.load_registry().items() if entry.converter == "diffusers")
    target = hub.checkpoint_dir(checkpoint_dir) / Path(HUB_IDS["UNetSpatioTemporalConditionModel"]).name
    raise hub.missing_weights_error(
        f"video model {str(source)!r} (not a folder, a Hub repo id, a registry name {registry} or an "
        f"architecture {sorted(ARCHITECTURES)})",
        f"a public model ({', '.join(HUB_IDS.values())}) on a machine with network access, e.g. "
        f"`hf download {HUB_IDS['UNetSpatioTemporalConditionModel']} --local-dir {target.name}`", target,
        f"then pass that folder, or its registry name {registry[0] if registry else ''}")


class VideoDiffusionModel(hub.PushToHubMixin, nn.Module):
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
    def from_pretrained(cls, source: str | Path, variant: str | None = None, conditioning: Conditioning | None = None,
                        use_ema: bool = True, checkpoint_dir: str | Path | None = None, *,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None) -> "VideoDiffusionModel":
        """Load a video model.

        Args:
            source: a `save_pretrained` folder or another diffusers folder of a supported backbone, a Hugging Face
                Hub repo id of one (`stabilityai/stable-video-diffusion-img2vid-xt`, or a repo push_to_hub wrote),
                a registry name (`svd-xt-pretrained`, `i2vgen-xl-pretrained`), a Lightning `.ckpt` of
                `VideoDiffusionModule`, or an architecture name of ARCHITECTURES (random weights: tests, smoke
                runs).
            variant: the weights variant of a diffusers folder ("fp16"), if not the default.
            conditioning: micro-conditions; default: those saved with the model (folder or checkpoint).
            use_ema: a `.ckpt` of a run with `ema_decay` loads its averaged weights (those it validated with).
            checkpoint_dir: where registry names resolve (default: `hub.checkpoint_dir()`).
            revision, cache_dir, token: for a Hub repo id (see `LRM.from_pretrained`).
        """
        if str(source) in ARCHITECTURES:
            return cls.build(str(source), conditioning)
        folder = resolve_pretrained_folder(source, checkpoint_dir, revision, cache_dir, token)
        if folder.is_file():
            return cls._from_lightning_checkpoint(folder, conditioning, use_ema, checkpoint_dir)
        index = json.loads((folder / "model_index.json").read_text())
        parts = {}
        for name in COMPONENT_LIBRARY:
            if name not in index or index[name] is None or index[name][1] is None:
                continue
            library, class_name = index[name]
            kwargs = ({"variant": variant}
                      if variant and name in ("unet", "vae", "image_encoder", "text_encoder") else {})
            parts[name] = _component_class(library, class_name).from_pretrained(folder / name, **kwargs)
        settings = folder / SETTINGS_FILE
        if conditioning is None and settings.is_file():
            conditioning = Conditioning(**json.loads(settings.read_text())["conditioning"])
        missing = {"unet", "scheduler", "image_encoder"} - set(parts)
        if missing:
            raise FileNotFoundError(f"{folder} has no {sorted(missing)}: not an image-conditioned video model")
        return cls(conditioning=conditioning, **parts)

    @classmethod
    def _from_lightning_checkpoint(cls, path: Path, conditioning: Conditioning | None, use_ema: bool,
                                   checkpoint_dir: str | Path | None) -> "VideoDiffusionModel":
        checkpoint = hub.read_lightning_checkpoint(path, "VideoDiffusionModule",
                                                   ("model", "trainable", "condition_dropout"),
                                                   fit_config="configs/video/tiny.yaml")
        hp = checkpoint.hparams
        defaults = Conditioning()
        conditioning = conditioning or Conditioning(
            fps=hp.get("fps", defaults.fps), motion_bucket_id=hp.get("motion_bucket_id", defaults.motion_bucket_id),
            noise_aug_strength=hp.get("noise_aug_strength", defaults.noise_aug_strength))
        model = cls.from_pretrained(hp["model"], variant=hp.get("variant"), conditioning=conditioning,
                                    checkpoint_dir=checkpoint_dir)
        state = dict(checkpoint.state)
        ema = checkpoint.raw.get("ema")
        if use_ema and isinstance(ema, dict):
            state.update({f"unet.{name}": value for name, value in ema["shadow"].items()})
        # over a pretrained base the checkpoint holds only the trained weights (VideoDiffusionModule keeps it small)
        over_base = hp["model"] not in ARCHITECTURES
        if over_base:
            names = (temporal_parameter_names(model.unet) if hp["trainable"] == "temporal"
                     else [name for name, _ in model.unet.named_parameters()])
            lacking = sorted(f"unet.{name}" for name in names if f"unet.{name}" not in state)
            if lacking:
                raise ValueError(f"{path} lacks {len(lacking)} trained parameters of {hp['model']}, e.g. "
                                 f"{lacking[:3]}: it was written by a different configuration")
        hub.load_state_into(model, state, path, allow_missing=over_base,
                            hint=f"the checkpoint's base model is {hp['model']!r}: check that it is the one it trained")
        return model

    def save_pretrained(self, folder: str | Path, card_data: dict | None = None) -> Path:
        """A diffusers-layout folder (model_index.json, one subfolder per component with its config.json and
        safetensors weights, written by the component's own save_pretrained, so that e.g.
        `diffusers.UNetSpatioTemporalConditionModel.from_pretrained(folder / "unet")` loads the denoiser), our
        micro-conditions and a README.md model card. An earlier save there is replaced only once every new file
        is written (`io.atomic_write_folder`). `push_to_hub(repo_id)` uploads the same files.

        Args:
            folder: the folder; created if absent.
            card_data: what the model card records (`hub.model_card`: license, training data, recipe, metrics).
        """
        index = {"_class_name": "VFusion3DOrbitVideoPipeline", "_diffusers_version": _diffusers_version()}
        components = {name: getattr(self, name) for name in COMPONENT_LIBRARY if getattr(self, name) is not None}
        for name, part in components.items():
            index[name] = [COMPONENT_LIBRARY[name], type(part).__name__]
        card = hub.model_card(
            "VFusion3D orbit video model",
            f"An image-conditioned video diffusion model ({self.kind}, diffusers) as VFusion3D's multi-view data "
            f"engine fine-tunes it: a condition image{' and a prompt' if self.text_encoder is not None else ''} "
            f"-> an orbit "
            f"video around the object. Micro-conditions: {asdict(self.conditioning)}.",
            "from vfusion3d_lightning.models.video import VideoDiffusionModel\n\n"
            "model = VideoDiffusionModel.from_pretrained(FOLDER).eval()",
            {"model_index.json": "the components and their classes (diffusers layout)",
             SETTINGS_FILE: "the micro-conditions training and sampling share (Conditioning)",
             **{f"{name}/": f"the {name}'s config and weights ({COMPONENT_LIBRARY[name]} "
                            f"{type(part).__name__}.from_pretrained loads it)" for name, part in components.items()}},
            pipeline_tag="image-to-video", tags=("diffusers", "video-diffusion", self.kind), card_data=card_data)

        def write(tmp: Path) -> None:
            for name, part in components.items():
                part.save_pretrained(tmp / name)
            (tmp / SETTINGS_FILE).write_text(json.dumps({"conditioning": asdict(self.conditioning)}, indent=2))
            (tmp / README_NAME).write_text(card)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

        return atomic_write_folder(folder, write, last=("model_index.json",))

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
