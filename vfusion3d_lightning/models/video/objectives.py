"""Training objectives: each backbone keeps the one its scheduler samples with.

- SVD-style (EulerDiscreteScheduler with continuous timesteps and v-prediction): the EDM preconditioning the
  scheduler inverts at sampling time, c_in = 1/sqrt(s^2+1), c_noise = log(s)/4, denoised =
  x/(s^2+1) - s/sqrt(s^2+1) * F, with log-normal sigmas and the EDM weight (s^2+1)/s^2 (sigma_data = 1).
- DDPM-family schedulers (I2VGen-XL's DDIM, ...): uniform timesteps, `add_noise`, and the target of the
  scheduler's `prediction_type` (noise, velocity or sample).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vfusion3d_lightning.models.video.model import Conditions, VideoDiffusionModel


def _per_sample_mean(values: Tensor) -> Tensor:
    return values.flatten(1).mean(1)


class EDMObjective:
    """EDM loss for v-predicting SVD-style denoisers."""

    def __init__(self, p_mean: float = 0.7, p_std: float = 1.6):
        self.p_mean, self.p_std = p_mean, p_std

    def loss(self, model: VideoDiffusionModel, latents: Tensor, cond: Conditions,
             generator: torch.Generator | None = None) -> Tensor:
        batch = latents.shape[0]
        log_sigma = self.p_mean + self.p_std * torch.randn(batch, generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        sigma = log_sigma.exp()
        denoised = self.denoise(model, latents + sigma.view(-1, 1, 1, 1, 1) * noise, log_sigma, cond)
        weight = (sigma ** 2 + 1) / sigma ** 2
        return (weight * _per_sample_mean((denoised - latents) ** 2)).mean()

    @staticmethod
    def denoise(model: VideoDiffusionModel, noisy: Tensor, log_sigma: Tensor, cond: Conditions) -> Tensor:
        """The denoised estimate of latents `noisy` (B, F, C, h, w) at noise levels exp(log_sigma) (B,)."""
        sigma = log_sigma.exp().view(-1, 1, 1, 1, 1)
        model_output = model(noisy / (sigma ** 2 + 1).sqrt(), 0.25 * log_sigma, cond).float()
        return noisy / (sigma ** 2 + 1) - sigma / (sigma ** 2 + 1).sqrt() * model_output


class SchedulerObjective:
    """The DDPM objective of a diffusers noise scheduler."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def loss(self, model: VideoDiffusionModel, latents: Tensor, cond: Conditions,
             generator: torch.Generator | None = None) -> Tensor:
        batch = latents.shape[0]
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch,), generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        model_output = model(noisy, timesteps, cond).float()
        return _per_sample_mean((model_output - target) ** 2).mean()


def objective_for(model: VideoDiffusionModel, p_mean: float = 0.7, p_std: float = 1.6):
    """The objective matching `model.scheduler`."""
    config = model.scheduler.config
    if type(model.scheduler).__name__ == "EulerDiscreteScheduler" and config.get("timestep_type") == "continuous":
        if config.prediction_type != "v_prediction":
            raise ValueError("continuous-timestep Euler schedulers are supported with v_prediction (SVD) only")
        return EDMObjective(p_mean, p_std)
    if hasattr(model.scheduler, "add_noise") and hasattr(model.scheduler, "get_velocity"):
        return SchedulerObjective(model.scheduler)
    raise ValueError(f"no training objective for scheduler {type(model.scheduler).__name__}")
