"""OrbitVideoPipeline: sample orbit videos from first frames (and prompts) with the model's own scheduler."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vfusion3d_lightning.models.video.model import VideoDiffusionModel


@dataclass
class SamplerSettings:
    """Sampling settings, stored with every generated sample. Guidance rises linearly over the frames from
    `min_guidance` to `max_guidance` (SVD's schedule); equal values give constant guidance (I2VGen-XL: 9.0).
    Classifier-free guidance runs when `max_guidance` > 1."""

    num_frames: int = 16
    num_inference_steps: int = 25
    min_guidance: float = 1.0
    max_guidance: float = 3.0
    decode_chunk: int = 8

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1 or self.num_frames < 2 or self.decode_chunk < 1:
            raise ValueError(f"need num_inference_steps >= 1, num_frames >= 2 and decode_chunk >= 1: {self}")

    def to_dict(self) -> dict:
        return asdict(self)


class OrbitVideoPipeline:
    """`pipe(images, prompts, seeds)` -> frames (B, F, 3, H, W) in [0, 1]; frame 0 is the condition view.

    Each sample draws its noise from a generator seeded with its own seed, so a sample's video does not depend
    on the batch it was generated in."""

    def __init__(self, model: VideoDiffusionModel, settings: SamplerSettings | None = None):
        self.model = model
        self.settings = settings or SamplerSettings()

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str] | None = None, seeds: list[int] | None = None,
                 progress: bool = True) -> Tensor:
        model, settings = self.model, self.settings
        batch, _, height, width = images.shape
        num_frames = settings.num_frames
        model.check_frames(num_frames, height, width)
        device = images.device
        seeds = list(range(batch)) if seeds is None else list(seeds)
        if len(seeds) != batch or (prompts is not None and len(prompts) != batch):
            raise ValueError(f"{batch} images need as many seeds and prompts, got {len(seeds)} and "
                             f"{len(prompts) if prompts is not None else 'no'}")
        generators = [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]
        scheduler = type(model.scheduler).from_config(model.scheduler.config)  # schedulers keep state
        scheduler.set_timesteps(settings.num_inference_steps, device=device)

        cond = model.conditions(images, prompts, num_frames, generators)
        guided = settings.max_guidance > 1
        if guided:
            cond = model.unconditional(images, num_frames, generators).cat(cond)
        guidance = torch.linspace(settings.min_guidance, settings.max_guidance, num_frames, device=device)
        guidance = guidance.view(1, num_frames, 1, 1, 1)

        channels = model.unet.config.out_channels
        factor = model.spatial_factor // 2 ** (len(model.unet.config.block_out_channels) - 1)
        shape = (num_frames, channels, height // factor, width // factor)
        latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
        latents = latents * scheduler.init_noise_sigma
        for t in tqdm(scheduler.timesteps, desc="denoise", leave=False, disable=not progress):
            model_input = scheduler.scale_model_input(latents, t)
            model_input = torch.cat([model_input] * 2) if guided else model_input
            timesteps = t.to(device).expand(model_input.shape[0])
            output = model(model_input.to(_dtype(model)), timesteps, cond).float()
            if guided:
                uncond, conditional = output.chunk(2)
                output = uncond + guidance * (conditional - uncond)
            latents = scheduler.step(output, t, latents).prev_sample
        return model.decode_latents(latents, chunk=settings.decode_chunk)


def _dtype(model: VideoDiffusionModel) -> torch.dtype:
    return next(model.unet.parameters()).dtype
