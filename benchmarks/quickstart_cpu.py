"""What the quickstart's CPU speed-ups buy, each measured alone on this machine.

    python benchmarks/quickstart_cpu.py [--steps 100]

1. The fine-tune step of configs/lrm/quickstart_finetune_3d.yaml (tiny network, 16 px renders, batch 4 x 2 views,
   data from procedural `solid` renders made here), as Lightning runs it: seconds a step (mean over `--steps` after
   30 warm-up steps) with grid_sample's gradient groups at 32 (the GPU setting) or 1 (the CPU's), and AdamW fused
   or not.
2. A render worker pool's start (2 spawned processes up and answering), with this script as the parent: each
   worker imports what the parent's main module imports.
3. `mesh_metrics` of a capsule against a box at 10,000 and 2,000 surface points (alignment included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import trimesh
import yaml

from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render_shards import RenderSettings, _Pool, render_folder
from vfusion3d_lightning.geometry.metrics import mesh_metrics
from vfusion3d_lightning.models.lrm import renderer
from vfusion3d_lightning.training import LRMModule
from vfusion3d_lightning.training.callbacks import ResolutionStages

ROOT = Path(__file__).resolve().parents[1]


class StepClock(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def step_seconds(shards: str, groups: int, fused: bool, steps: int, warmup: int = 30) -> float:
    config = yaml.safe_load((ROOT / "configs/lrm/quickstart_finetune_3d.yaml").read_text())
    model = dict(config["model"]["init_args"], pretrained=None, fused_optimizer=fused,
                 network=yaml.safe_load((ROOT / "configs/lrm/network/quickstart.yaml").read_text()))
    data = dict(config["data"]["init_args"], train_shards=shards, val_shards=None)
    renderer.GRADIENT_GROUPS = groups
    from vfusion3d_lightning.data.datamodules import MultiViewDataModule

    clock = StepClock(warmup)
    trainer = L.Trainer(accelerator="cpu", max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[clock, ResolutionStages([16], [4])])
    trainer.fit(LRMModule(**model), MultiViewDataModule(**data))
    return (clock.end - clock.start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_assets(Path(tmp, "assets"), 24, seed=0, style="solid", progress=False)
        render_folder(Path(tmp, "assets"), Path(tmp, "set32"), RenderSettings(views="random32", resolution=64),
                      workers=2, shard_size=8, progress=False)
        shards = str(Path(tmp, "set32", "shard-*.tar"))
        print("| gradient groups | fused AdamW | s / step |\n| --- | --- | --- |")
        for groups, fused in ((32, False), (1, False), (32, True), (1, True)):
            print(f"| {groups} | {fused} | {step_seconds(shards, groups, fused, args.steps):.3f} |", flush=True)
    started = time.perf_counter()
    _Pool(2, RenderSettings(views="random32", resolution=64), None).close()
    print(f"render pool of 2 up in {time.perf_counter() - started:.1f} s")
    capsule, box = trimesh.creation.capsule(0.5, 0.3), trimesh.creation.box((0.5, 0.6, 0.8))
    for points in (10_000, 2_000):
        started = time.perf_counter()
        mesh_metrics(capsule, box, points=points)
        print(f"mesh_metrics at {points:,} points: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
