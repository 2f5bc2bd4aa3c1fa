"""LRMModule: trains the VFusion3D LRM with the paper's recipe (LPIPS + opacity, optional L2, patches)."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from vfusion3d_lightning.cameras import turntable_cameras
from vfusion3d_lightning.data.datamodules import restore_loader_states
from vfusion3d_lightning.io import to_uint8_images
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.lora import LoraOptions, add_lora, merge_lora, save_lora
from vfusion3d_lightning.training.losses import build_lpips, lpips_loss, opacity_loss, pixel_l2
from vfusion3d_lightning.training.media import log_image, log_video
from vfusion3d_lightning.training.schedules import WarmupCosineRestarts
from vfusion3d_lightning.training.seeding import run_seed, step_generator


def resize_views(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, V, C, H, W) -> (B, V, C, size, size), area-averaged when shrinking."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    flat = images.flatten(0, 1)
    mode = "area" if size < images.shape[-1] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(flat, size=(size, size), mode=mode, **kwargs).unflatten(0, images.shape[:2])


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices and kernels; none on biases, norms, layer scales,
    position embeddings and the class token."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or name.endswith("pos_embed") or name.endswith("cls_token")
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LRMModule(L.LightningModule):
    """The LRM and its training recipe. The network is `self.model` (an `LRM`); `export(dir)` saves it.

    Training step: encode the input view with the canonical source camera, render K supervision views as a
    `patch_size` patch at a random place of the current `render_size` image (set per epoch by
    `ResolutionStages`), compare with the same crop of the resized ground truth.

    gradient_checkpointing: True recomputes encoder and transformer blocks and each renderer pass of `max_rays`
    rays in the backward pass; "network" only the blocks (on a GPU the fused field query keeps 16 bytes a
    sample, so recomputing the renderer saves less memory than its time is worth: BENCHMARKS.md); "selective"
    recomputes only the blocks' elementwise work and keeps their matrix products and attention.
    seed: the seed of the training step's random draws (the patch's place, the renderer's sample jitter); None takes
    the run's `seed_everything` seed. Each draw has its own generator, seeded by `draw_seed` from this seed, the
    global rank, the global step and the micro-batch: not the global RNG, which every DDP rank seeds alike and a
    resumed run does not restore.
    recompute_blocks: under checkpointing, recompute only the first this many of the transformer's blocks (None:
    all), for a batch that leaves memory over. compile_network: `LRM.compile_network`. fused_optimizer: AdamW's
    one-kernel step; None takes it on a CUDA GPU or the CPU without fp16's grad scaler.
    freeze_encoder: train all but the image encoder (its weights stay those of `pretrained`).
    lora: LoRA adapters (`LoraOptions`: rank, alpha, dropout, target layers) on the transformer through peft, added
    after `pretrained` loads; only the adapters train. `export` merges them into the weights it writes and saves
    them on their own beside (`adapter/`).
    """

    def __init__(
        self,
        network: LRMConfig = LRMConfig(),
        pretrained: str | None = None,
        encoder_weights: str | None = None,
        lr: float = 4e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 3000,
        min_lr_ratio: float = 0.0,
        render_size: int = 128,
        patch_size: int = 128,
        lpips_weight: float = 1.0,
        opacity_weight: float = 1.0,
        l2_weight: float = 0.0,
        lpips_backbone_weights: str | None = None,
        lpips_random_backbone: bool = False,
        gradient_checkpointing: bool | Literal["network", "selective"] = False,
        recompute_blocks: int | None = None,
        compile_network: bool = False,
        fused_optimizer: bool | None = None,
        freeze_encoder: bool = False,
        lora: LoraOptions | None = None,
        max_rays: int | None = None,
        val_render_size: int = 128,
        turntable_frames: int = 8,
        seed: int | None = None,
    ):
        super().__init__()
        config = LRMConfig.from_dict(network) if isinstance(network, dict) else network
        if patch_size < 1 or render_size < 1:
            raise ValueError(f"render_size and patch_size must be positive, got {render_size}, {patch_size}")
        if gradient_checkpointing not in (True, False, "network", "selective"):
            raise ValueError("gradient_checkpointing must be true, false, 'network' or 'selective', got "
                             f"{gradient_checkpointing!r}")
        lora_options = LoraOptions.from_value(lora)
        # plain types in the checkpoint, so it loads with weights_only=True
        network = config.to_dict()
        lora = None if lora_options is None else asdict(lora_options)
        self.save_hyperparameters()
        self.model = LRM(config)
        if pretrained:
            self._load_pretrained(pretrained)
        elif encoder_weights:
            self.model.load_encoder_weights(encoder_weights)
        if lora_options is not None:
            add_lora(self.model, lora_options)  # freezes all but the adapters
        if freeze_encoder:
            self.model.encoder.requires_grad_(False)
        blocks = "selective" if gradient_checkpointing == "selective" else bool(gradient_checkpointing)
        self.model.set_gradient_checkpointing(blocks, renderer=gradient_checkpointing is True,
                                              transformer_blocks=recompute_blocks)
        if compile_network:
            self.model.compile_network()
        self.lpips = build_lpips(lpips_backbone_weights, lpips_random_backbone)
        self.render_size = render_size
        self.restart_epochs: list[int] = []  # set by LRRestartAtStage before the optimizer is built
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_lpips = MeanMetric()

    def _load_pretrained(self, source: str) -> None:
        """Start from LRM weights: whatever `LRM.from_pretrained` reads (a registry name, a save_pretrained folder,
        the released checkpoint, a Lightning checkpoint of this module), into this module's network sizes."""
        self.model.load_state_dict(LRM.from_pretrained(source, config=self.model.config).state_dict())

    # ------------------------------------------------------------------ training

    def forward(self, image: torch.Tensor, source_camera: torch.Tensor) -> torch.Tensor:
        return self.model(image, source_camera)

    def _generator(self, batch_idx: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
        """`step_generator` of this module's seed (the run's seed_everything seed when the `seed` hparam is None)."""
        return step_generator(self._trainer, run_seed(self.hparams.get("seed")), batch_idx, stream, device)

    def _patch(self, size: int, batch_idx: int = 0) -> tuple[int, int, int]:
        """(x0, y0, extent): the patch of a `size` render that the training batch `batch_idx` supervises."""
        extent = min(self.hparams.patch_size, size)
        corner = torch.randint(0, size - extent + 1, (2,), generator=self._generator(batch_idx, "patch")).tolist()
        return corner[0], corner[1], extent

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        size = self.render_size
        x0, y0, extent = self._patch(size, batch_idx)
        planes = self.model(batch["input_image"], batch["source_camera"])
        out = self.model.render(planes, batch["render_cameras"], size, patch=(x0, y0, extent),
                                generator=self._generator(batch_idx, "render", planes.device),
                                max_rays=self.hparams.max_rays)
        target = resize_views(batch["target_images"], size)[..., y0:y0 + extent, x0:x0 + extent]
        mask = resize_views(batch["target_masks"], size)[..., y0:y0 + extent, x0:x0 + extent]
        rgb = out.rgb.flatten(0, 1)
        losses = {"opacity": opacity_loss(out.opacity, mask)}
        if self.hparams.lpips_weight:
            losses["lpips"] = lpips_loss(self.lpips, rgb, target.flatten(0, 1))
        if self.hparams.l2_weight:
            losses["l2"] = pixel_l2(rgb, target.flatten(0, 1))
        weights = {"opacity": self.hparams.opacity_weight, "lpips": self.hparams.lpips_weight,
                   "l2": self.hparams.l2_weight}
        loss = sum(weights[name] * value for name, value in losses.items())
        batch_size = batch["input_image"].shape[0]
        self.log_dict({f"train/{name}": value.detach() for name, value in losses.items()}, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        # the LR this step uses (the scheduler moves it after the optimizer step); a CPU tensor, as Lightning would
        # copy a float to the GPU, which waits for the GPU's queue to drain
        self.log("train/lr", torch.tensor(float(self.optimizers().param_groups[0]["lr"])), on_step=True,
                 on_epoch=False)
        return loss

    def on_train_start(self) -> None:
        restore_loader_states(self.trainer)  # configure_optimizers read estimated_stepping_batches before the restore
        counts = self.parameter_counts()
        rank_zero_info(f"LRM parameters: {counts['trainable']:,} trainable of {counts['total']:,} "
                       f"({counts['trainable_fraction']:.2%}; {self._training_mode()}); AdamW state "
                       f"{counts['optimizer_state_bytes'] / 2**20:.1f} MiB")
        if self.logger is not None:
            self.logger.log_metrics({f"parameters/{k}": float(v) for k, v in counts.items()}, step=self.global_step)

    def _training_mode(self) -> str:
        if self.hparams.get("lora"):
            return f"LoRA rank {self.hparams.lora['rank']} adapters"
        return "encoder frozen" if self.hparams.get("freeze_encoder") else "full fine-tune"

    def parameter_counts(self) -> dict[str, float]:
        """Trainable and total parameters of the network, and the bytes of AdamW's state for the trainable ones
        (two moments each, in the parameters' dtype)."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        total = sum(p.numel() for p in self.model.parameters())
        count = sum(p.numel() for p in trainable)
        return {"trainable": count, "total": total, "trainable_fraction": count / max(total, 1),
                "optimizer_state_bytes": sum(2 * p.numel() * p.element_size() for p in trainable)}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # fused: one kernel for all parameters (on a GPU 39 against 6 ms a step of 452M parameters, BENCHMARKS.md;
        # on a CPU 0.107 -> 0.094 s a quickstart step, BENCHMARKS.md); not under fp16's grad scaler, which a fused step
        # would unscale itself, out of reach of clipping
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = hp.fused_optimizer
        if fused is None:
            fused = scaler is None and all(p.is_cuda or p.is_cpu for p in self.model.parameters())
        elif fused and scaler is not None:
            raise ValueError("fused_optimizer: true cannot run under fp16 mixed precision (its grad scaler): use "
                             "precision bf16-mixed or 32, or fused_optimizer: null")
        optimizer = torch.optim.AdamW(decay_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas),
                                      fused=fused or None)
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, self.trainer.num_training_batches // self.trainer.accumulate_grad_batches)
        scheduler = WarmupCosineRestarts(optimizer, total_steps=total, warmup_steps=hp.warmup_steps,
                                         restart_steps=[e * steps_per_epoch for e in self.restart_epochs],
                                         min_lr_ratio=hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not (gradient_clip_val and getattr(optimizer, "defaults", {}).get("fused")):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, for fear of fp16 gradients it
        # would unscale itself; a fused one runs only without a grad scaler, so these gradients are true ones
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        size = self.hparams.val_render_size
        planes = self.model(batch["input_image"], batch["source_camera"])
        out = self.model.render(planes, batch["render_cameras"], size, max_rays=self.hparams.max_rays)
        rgb = out.rgb.flatten(0, 1).float().clamp(0, 1)
        target = resize_views(batch["target_images"], size).flatten(0, 1).float()
        self.val_psnr.update(rgb, target)
        self.val_ssim.update(rgb, target)
        self.val_lpips.update(lpips_loss(self.lpips, rgb, target))
        batch_size = batch["input_image"].shape[0]
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=batch_size)
        self.log("val/ssim", self.val_ssim, batch_size=batch_size)
        self.log("val/lpips", self.val_lpips, batch_size=batch_size)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._save_turntable(batch["input_image"][:1], planes[:1])

    def _save_turntable(self, image: torch.Tensor, planes: torch.Tensor) -> None:
        """Input view and a turntable of the first validation object, as one image row and as a video: saved
        under `<log dir>/turntables/` and logged to every logger that takes media (training/media.py)."""
        size = self.hparams.val_render_size
        cameras = turntable_cameras(self.hparams.turntable_frames).to(planes.device)[None]
        frames = self.model.render(planes, cameras, size, max_rays=self.hparams.max_rays).rgb[0].float().clamp(0, 1)
        row = torch.cat([F.interpolate(image.float(), size=(size, size), mode="area"), frames])
        grid = np.concatenate(list(to_uint8_images(row)), axis=1)  # one strip, left to right
        log_image(self.trainer, "val/turntable", grid, "turntables")
        log_video(self.trainer, "val/turntable_video", frames, "turntables")

    # ------------------------------------------------------------------ checkpoints and export

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the LPIPS judge is frozen and rebuilt at construction (its weights file, or its seeded random trunk): 60 MB
        # a checkpoint otherwise, which a CPU run saving every few steps spends seconds writing
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("lpips.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].update({f"lpips.{k}": v for k, v in self.lpips.state_dict().items()})

    def export(self, directory: str | Path) -> Path:
        """`LRM.save_pretrained` of the trained network (LoRA adapters merged into it), for `LRM.from_pretrained`
        and inference, with a model card of its training; a LoRA fine-tune's adapters also on their own in
        `directory/adapter`.

        Args:
            directory: the folder to write.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data = dict(getattr(datamodule, "hparams", None) or {})
        step = self.global_step if self._trainer is not None else None
        return export_lrm(self.model, dict(self.hparams), data, step, directory)


ADAPTER_FOLDER = "adapter"


def training_card(hparams: dict[str, Any], data: dict[str, Any], step: int | None) -> dict[str, Any]:
    """The model card's `training_data` and `recipe` (hub.model_card) of an LRMModule run, from its
    hyper-parameters, its data module's and the optimizer steps it ran."""
    train, held_out = data.get("train_shards"), data.get("val_shards")
    training_data = (f"Multi-view shards `{train}`" + (f", validated on `{held_out}`" if held_out else "") + "."
                     if train else None)
    lora = hparams.get("lora")
    if lora:
        how = (f"LoRA adapters of rank {lora['rank']} (alpha {lora['alpha']:g}) on the layers matching "
               f"`{lora['targets']}`, merged into these weights; the adapters alone are in `{ADAPTER_FOLDER}/`")
    else:
        how = "all weights trained" + (" but the image encoder's" if hparams.get("freeze_encoder") else "")
    start = hparams.get("pretrained") or "random initialisation"
    losses = ", ".join(f"{name} {hparams.get(key, 0):g}" for name, key in
                       (("LPIPS", "lpips_weight"), ("opacity", "opacity_weight"), ("pixel L2", "l2_weight"))
                       if hparams.get(key))
    steps = f"{step:,} optimizer steps, " if step else ""
    recipe = (f"From `{start}`: {how}. {steps}AdamW at peak LR {hparams.get('lr', 0):g} (warm-up "
              f"{hparams.get('warmup_steps', 0)} steps, cosine); losses: {losses}; renders of "
              f"{hparams.get('render_size')} px.")
    return {"training_data": training_data, "recipe": recipe}


def export_lrm(model: LRM, hparams: dict[str, Any], data: dict[str, Any], step: int | None,
               directory: str | Path) -> Path:
    """Write `model` (an LRMModule's network, with LoRA adapters if `hparams` has them) as a save_pretrained
    folder with its model card; adapters merged into the weights, and also saved alone in `adapter/`."""
    card = training_card(hparams, data, step)
    lora = hparams.get("lora")
    if not lora:
        return model.save_pretrained(directory, card)
    out = merge_lora(copy.deepcopy(model)).save_pretrained(directory, card)
    save_lora(model, Path(out) / ADAPTER_FOLDER, LoraOptions(**lora), base_model=hparams.get("pretrained"))
    return out
