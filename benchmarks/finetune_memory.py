"""Peak GPU memory and speed of fine-tuning the released-size LRM (configs/lrm/finetune_yours.yaml's step) per
memory option: full fine-tune with and without checkpointing, frozen encoder, LoRA.

    python benchmarks/finetune_memory.py [--batch-size 4 8] [--steps 8] [--modes full full_ckpt lora_ckpt ...]

One `LRMModule.training_step` as Lightning runs it for finetune_yours.yaml: released network sizes (random
weights: memory and speed do not depend on their values), bf16-mixed, fused AdamW, LPIPS-VGG (random trunk) +
opacity + pixel L2, 512 px input, 4 supervision views as 128x128 patches of a 384 px render. Peak memory is
torch's max allocated and max reserved (what the GPU must hold) from the first step on, so it includes AdamW's
state; items/s from the median step after 3 warm-up steps. Modes:

    full         every weight trains, nothing recomputed
    full_ckpt    every weight trains, the encoder's and transformer's blocks recomputed (finetune_yours.yaml)
    freeze_ckpt  all but the encoder train, blocks recomputed
    lora         LoRA rank 16 on the transformer's attention and MLP layers, nothing recomputed
    lora_ckpt    LoRA rank 16, blocks recomputed
"""

from __future__ import annotations

import argparse
import gc
import statistics

import lightning as L
import torch
from lrm_train_step import Repeat, StepTimer, synthetic_batch
from torch.utils.data import DataLoader

from vfusion3d_lightning.models.lrm import LRMConfig
from vfusion3d_lightning.training import LRMModule

CUDA = torch.cuda.is_available()
MODES = {
    "full": {},
    "full_ckpt": {"gradient_checkpointing": "network"},
    "freeze_ckpt": {"gradient_checkpointing": "network", "freeze_encoder": True},
    "lora": {"lora": {"rank": 16, "alpha": 16.0}},
    "lora_ckpt": {"gradient_checkpointing": "network", "lora": {"rank": 16, "alpha": 16.0}},
}


def measure(config: LRMConfig, mode: str, batch_size: int, steps: int) -> dict:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    module = LRMModule(network=config, lr=1e-4, warmup_steps=0, render_size=384, patch_size=128, lpips_weight=1.0,
                       opacity_weight=1.0, l2_weight=1.0, lpips_random_backbone=True, turntable_frames=0,
                       **MODES[mode])
    counts = module.parameter_counts()
    timer = StepTimer()
    trainer = L.Trainer(accelerator="gpu" if CUDA else "cpu", devices=1, precision="bf16-mixed",
                        max_steps=3 + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=1.0)
    batch = synthetic_batch(batch_size, config.encoder_img_size or 512)
    trainer.fit(module, DataLoader(Repeat(batch), batch_size=None, pin_memory=CUDA))
    seconds = statistics.median(timer.times[3:])
    result = {"mode": mode, "batch": batch_size, "trainable_M": counts["trainable"] / 1e6,
              "adamw_state_MiB": counts["optimizer_state_bytes"] / 2**20, "step_s": seconds,
              "items_per_s": batch_size / seconds,
              "peak_allocated_GiB": torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan"),
              "peak_reserved_GiB": torch.cuda.max_memory_reserved() / 2**30 if CUDA else float("nan")}
    del trainer, module
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--preset", default="vfusion3d", help="network preset (tiny: a CPU check of the script)")
    args = parser.parse_args()
    config = LRMConfig.from_name(args.preset)
    device = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"device: {device}; torch {torch.__version__}; preset {args.preset}")
    print("| mode | batch | trainable (M) | AdamW state (MiB) | step (s) | items/s | peak allocated (GiB) | "
          "peak reserved (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch_size in args.batch_size:
        for mode in args.modes:
            try:
                r = measure(config, mode, batch_size, args.steps)
            except torch.OutOfMemoryError:
                print(f"| {mode} | {batch_size} | out of memory | | | | | |", flush=True)
                continue
            print(f"| {r['mode']} | {r['batch']} | {r['trainable_M']:.1f} | {r['adamw_state_MiB']:.0f} | "
                  f"{r['step_s']:.3f} | {r['items_per_s']:.2f} | {r['peak_allocated_GiB']:.1f} | "
                  f"{r['peak_reserved_GiB']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
