"""VideoDiffusionModule: fine-tunes an image(+text)-conditioned video diffusion model on orbit videos,
training only its temporal layers (the paper's recipe), with the backbone's own diffusion objective."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from vfusion3d_lightning.data.datamodules import restore_loader_states
from vfusion3d_lightning.io import to_uint8_images
from vfusion3d_lightning.models.video import (
    Conditioning,
    OrbitVideoPipeline,
    SamplerSettings,
    VideoDiffusionModel,
    objective_for,
    train_temporal_only,
)
from vfusion3d_lightning.training.ema import ParameterEMA
from vfusion3d_lightning.training.media import log_image
from vfusion3d_lightning.training.schedules import WarmupCosineRestarts
from vfusion3d_lightning.training.seeding import run_seed, step_generator, step_global_rng


class VideoDiffusionModule(L.LightningModule):
    """Batches come from `VideoDataModule`: frames (B, F, 3, S, S) in [0, 1], prompt (list of str).

    The first frame is the image condition and the prompt the text condition (for backbones that take text);
    conditions are dropped together with probability `condition_dropout` so that classifier-free guidance
    works at sampling time. `model` is what `VideoDiffusionModel.from_pretrained` reads: an architecture name
    (random weights, see models/video/architectures.py), a registry name, a local diffusers folder or cached hub
    id of a public video model. `export(dir)` writes a save_pretrained folder; `VideoDiffusionModel.from_pretrained`
    also reads this module's `.ckpt` directly (with its EMA weights). `seed` seeds the training step's draws (noise,
    noise level, condition dropout, and the UNet's dropout layers) per rank, step and micro-batch
    (`training.seeding`); None takes the run's `seed_everything` seed.
    """

    def __init__(
        self,
        model: str = "tiny-svd",
        variant: str | None = None,
        trainable: Literal["temporal", "all"] = "temporal",
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 500,
        min_lr_ratio: float = 1.0,
        condition_dropout: float = 0.1,
        gradient_checkpointing: bool = False,
        ema_decay: float | None = None,
        fps: int = 7,
        motion_bucket_id: int = 127,
        noise_aug_strength: float = 0.02,
        p_mean: float = 0.7,
        p_std: float = 1.6,
        sample_every_n_epochs: int = 1,
        sample_steps: int = 25,
        min_guidance: float = 1.0,
        max_guidance: float = 3.0,
        seed: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        self.save_hyperparameters()
        conditioning = Conditioning(fps=fps, motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength)
        self.model = VideoDiffusionModel.from_pretrained(model, variant=variant, conditioning=conditioning)
        if trainable == "temporal":
            self.trained, self.total = train_temporal_only(self.model.unet)
        else:
            self.model.unet.requires_grad_(True)
            self.total = self.trained = sum(p.numel() for p in self.model.unet.parameters())
        rank_zero_info(f"video model {model} ({self.model.kind}): training {self.trained:,} {trainable} of "
                       f"{self.total:,} UNet parameters ({100 * self.trained / self.total:.1f}%)")
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.objective = objective_for(self.model, p_mean, p_std)
        self.ema: ParameterEMA | None = None
        self._pending_ema: dict | None = None
        # frozen weights of a pretrained base reload from `model`; random ones must travel in the checkpoint
        self.strict_loading = not self._frozen_weights_reload()

    def _frozen_weights_reload(self) -> bool:
        from vfusion3d_lightning.models.video import ARCHITECTURES

        return self.hparams.model not in ARCHITECTURES

    # ------------------------------------------------------------------ training

    def _loss(self, batch: dict, generator: torch.Generator | None = None, dropout: float = 0.0) -> torch.Tensor:
        frames = batch["frames"]
        self.model.check_frames(frames.shape[1], frames.shape[-2], frames.shape[-1])
        drop = None
        if dropout > 0:
            drop = torch.rand(frames.shape[0], generator=generator, device=frames.device) < dropout
        latents = self.model.encode_frames(frames, generator)
        generators = None if generator is None else [generator] * frames.shape[0]
        cond = self.model.conditions(frames[:, 0], batch.get("prompt"), frames.shape[1], generators, drop=drop)
        return self.objective.loss(self.model, latents, cond, generator)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # noise, noise levels, condition dropout: drawn per rank and per step, not from the global RNG that every
        # DDP rank seeds alike and a resumed run restarts
        seed = run_seed(self.hparams.get("seed"))
        generator = step_generator(self._trainer, seed, batch_idx, "diffusion", self.device)
        # the UNet's own dropout (I2VGen-XL's temporal convolutions) draws from the global RNG: seed it likewise
        with step_global_rng(self._trainer, seed, batch_idx, "dropout", self.device):
            loss = self._loss(batch, generator, dropout=self.hparams.condition_dropout)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["frames"].shape[0])
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_fit_start(self) -> None:
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics({"params/trained": float(self.trained), "params/total": float(self.total)}, 0)
        if self.hparams.ema_decay is not None:
            self.ema = ParameterEMA(self.model.unet, self.hparams.ema_decay).to(self.device)
            if self._pending_ema is not None:
                self.ema.load_state_dict(self._pending_ema)
                self._pending_ema = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: checkpoint callbacks run before that hook and would miss this update
        if self.ema is not None:
            self.ema.update(self.model.unet)

    def on_train_start(self) -> None:
        restore_loader_states(self.trainer)  # configure_optimizers read estimated_stepping_batches before the restore

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.model.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        scheduler = WarmupCosineRestarts(optimizer, total_steps=int(self.trainer.estimated_stepping_batches),
                                         warmup_steps=hp.warmup_steps, min_lr_ratio=hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ validation

    def _averaged(self, include_loaded: bool = False):
        """Run with the EMA weights in the UNet, if any. `include_loaded`: also the EMA of a checkpoint this module
        was loaded from without fitting since (fitting builds `self.ema` from it in on_fit_start)."""
        ema = self.ema
        if ema is None and include_loaded and self._pending_ema is not None:
            ema = ParameterEMA(self.model.unet, self.hparams.ema_decay or 0.999)
            ema.load_state_dict(self._pending_ema)
        return ema.applied(self.model.unet) if ema is not None else nullcontext()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # same noise and timesteps for the same batch every time: comparable across epochs
        generator = torch.Generator(self.device).manual_seed(batch_idx)
        with self._averaged():
            loss = self._loss(batch, generator)
            if (batch_idx == 0 and self.hparams.sample_every_n_epochs and self.trainer.is_global_zero
                    and not self.trainer.sanity_checking
                    and (self.current_epoch + 1) % self.hparams.sample_every_n_epochs == 0):
                self._save_samples(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["frames"].shape[0], sync_dist=True)

    def _save_samples(self, batch: dict, count: int = 2) -> None:
        """Generated orbits for the first validation clips (above each: the ground truth), as one PNG grid."""
        frames = batch["frames"][:count]
        settings = SamplerSettings(num_frames=frames.shape[1], num_inference_steps=self.hparams.sample_steps,
                                   min_guidance=self.hparams.min_guidance, max_guidance=self.hparams.max_guidance)
        prompts = batch.get("prompt")
        generated = OrbitVideoPipeline(self.model, settings)(frames[:, 0], prompts[:count] if prompts else None,
                                                             seeds=list(range(frames.shape[0])), progress=False)
        grid = orbit_grid(torch.stack([frames.float(), generated], 1).flatten(0, 1))
        log_image(self.trainer, "val/orbits", grid, "samples")  # <log dir>/samples/ and every media logger

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        if self._frozen_weights_reload():  # keep checkpoints to the trained weights
            trained = {f"model.unet.{n}" for n, p in self.model.unet.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._frozen_weights_reload():
            trained = {f"model.unet.{n}" for n, p in self.model.unet.named_parameters() if p.requires_grad}
            missing = trained - set(checkpoint["state_dict"])
            if missing:
                raise KeyError(f"checkpoint lacks {len(missing)} trained parameters of {self.hparams.model}, "
                               f"e.g. {sorted(missing)[:3]}: it was written by a different configuration")
        self._pending_ema = checkpoint.get("ema")

    def export(self, directory: str | Path, use_ema: bool = True) -> Path:
        """`VideoDiffusionModel.save_pretrained` of the model, with the averaged weights when EMA is on.

        Args:
            directory: the folder to write.
            use_ema: write the EMA weights (those validation used) where the run keeps an average.
        """
        with self._averaged(include_loaded=True) if use_ema else nullcontext():
            return self.model.save_pretrained(directory)


def orbit_grid(videos: torch.Tensor) -> np.ndarray:
    """(R, F, 3, H, W) in [0, 1] -> one (R*H, F*W, 3) uint8 image: a row per video, frames left to right."""
    rows = [np.concatenate(list(to_uint8_images(video)), axis=1) for video in videos]
    return np.concatenate(rows, axis=0)
