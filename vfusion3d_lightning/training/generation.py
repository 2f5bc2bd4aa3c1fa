"""Orbit videos at scale: `VideoGenerator.predict_step` writes one planned shard of videos, so `Trainer.predict`
spreads shards over GPUs and machines (`--trainer.devices`, `--trainer.num_nodes`, SLURM, torchrun) as it spreads
training.

The plan (`generate_plan.json` in the output folder) deals the inputs to shards once, on global rank 0, before any
rank starts: every rank reads the same plan, so 1 GPU and N GPUs write the same shards, byte for byte (each video's
seed comes from the run seed and its key, each shard's batches are the same). A rerun with the same inputs keeps
the plan and skips complete shards; a killed rank loses only its shard in flight (`.tar.partial`, removed on the
rerun). Inputs that changed get a new plan for the keys not yet in complete shards, numbered after them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from vfusion3d_lightning.data.generate_shards import GenerationInput, generate_sample, read_inputs, sample_seed
from vfusion3d_lightning.data.preprocess import preprocess
from vfusion3d_lightning.data.schema import (
    ShardJobReport,
    complete_shards,
    encode_sample,
    resume_shard_folder,
    write_shard,
)
from vfusion3d_lightning.io import atomic_write, folder_lock
from vfusion3d_lightning.models.video import OrbitVideoPipeline, SamplerSettings, VideoDiffusionModel

PLAN_NAME = "generate_plan.json"
REPORT_NAME = "generate_report.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def make_plan(inputs: list[GenerationInput], out_dir: Path, shard_size: int) -> list[dict[str, Any]]:
    """The shards still to write, [{"shard": index, "keys": [...]}], kept in `out_dir/generate_plan.json`: the
    saved plan when it was made for the same inputs and shard size, else the keys not in complete shards, in
    input order, `shard_size` a shard, numbered after the complete shards."""
    keys = [item.key for item in inputs]
    digest = hashlib.sha256(json.dumps([keys, shard_size]).encode()).hexdigest()
    path = out_dir / PLAN_NAME
    done = resume_shard_folder(out_dir)  # the shards in flight when a run was killed are made again
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("inputs") == digest:
            return saved["shards"]
    todo = [key for key in keys if key not in done]
    start = 1 + max((int(p.name[6:12]) for p in complete_shards(out_dir)), default=-1)
    shards = [{"shard": start + i, "keys": todo[k:k + shard_size]}
              for i, k in enumerate(range(0, len(todo), shard_size))]
    text = json.dumps({"inputs": digest, "shard_size": shard_size, "shards": shards}, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return shards


class PlannedShards(Dataset):
    """One item a planned shard: its index, inputs and preprocessed condition images (in loader workers)."""

    def __init__(self, shards: list[dict[str, Any]], inputs: dict[str, GenerationInput], frame_size: int,
                 border_ratio: float | None, background: str):
        self.shards, self.inputs = shards, inputs
        self.frame_size, self.border_ratio, self.background = frame_size, border_ratio, background

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        planned = self.shards[index]
        items, images, failed = [], [], []
        for key in planned["keys"]:
            item = self.inputs[key]
            try:
                images.append(preprocess(item.image, self.frame_size, self.border_ratio, self.background))
                items.append(item)
            except (ValueError, FileNotFoundError, OSError) as err:
                failed.append({"key": item.key, "image": str(item.image), "reason": str(err)})
        return {"shard": planned["shard"], "items": items, "failed": failed,
                "images": torch.stack(images) if images else torch.empty(0)}


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


class GenerationDataModule(L.LightningDataModule):
    """Condition images and prompts (a folder, .jsonl or .csv: `data/generate_shards.py`, or the inputs read)
    dealt into planned shards of `out`; holds the folder's lock on global rank 0 while the job runs (`release`
    lets go of it if the job stops on an error)."""

    def __init__(self, inputs: str | Path | list[GenerationInput], out: str | Path, shard_size: int = 64,
                 frame_size: int = 256,
                 border_ratio: float | None = 0.2, background: str = "auto", num_workers: int = 2):
        super().__init__()
        self.inputs, self.out, self.shard_size = inputs, Path(out), shard_size
        self.frame_size, self.border_ratio, self.background = frame_size, border_ratio, background
        self.num_workers = num_workers
        self.prepare_data_per_node = False  # one plan for every machine: the folder is shared
        self._lock = contextlib.ExitStack()
        self.todo: list[dict[str, Any]] = []
        self.planned = 0
        self.skipped_existing = 0

    def _read(self) -> list[GenerationInput]:
        return self.inputs if isinstance(self.inputs, list) else read_inputs(self.inputs)

    def prepare_data(self) -> None:  # global rank 0, before the other ranks set up
        self._lock.enter_context(folder_lock(self.out, "generate"))
        make_plan(self._read(), self.out, self.shard_size)

    def setup(self, stage: str) -> None:
        inputs = self._read()
        plan = json.loads((self.out / PLAN_NAME).read_text())["shards"]
        self.todo = [s for s in plan if not (self.out / shard_name(s["shard"])).is_file()]
        self.planned = sum(len(s["keys"]) for s in plan)
        self.skipped_existing = len(inputs) - sum(len(s["keys"]) for s in self.todo)
        self.dataset = PlannedShards(self.todo, {item.key: item for item in inputs}, self.frame_size,
                                     self.border_ratio, self.background)

    def predict_dataloader(self) -> DataLoader:
        # one shard an item; Lightning deals them over ranks (rank r: items r, r+W, ...) without repeats
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is)

    def teardown(self, stage: str) -> None:
        self.release()

    def release(self) -> None:
        self._lock.close()


class VideoGenerator(L.LightningModule):
    """A video model that writes one planned shard of orbit videos a predict step (see the module docstring)."""

    def __init__(self, model: VideoDiffusionModel | str, out: str | Path, settings: SamplerSettings,
                 batch_size: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32, model_name: str = ""):
        super().__init__()
        network = model if isinstance(model, VideoDiffusionModel) else VideoDiffusionModel.from_pretrained(model)
        self.network = network.to(dtype).eval()
        self.model_name = model_name or (model if isinstance(model, str) else "")
        self.out, self.settings = Path(out), settings
        self.batch_size, self.seed = batch_size, seed
        self.report = ShardJobReport()

    def on_predict_start(self) -> None:
        self.pipe = OrbitVideoPipeline(self.network, self.settings)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        self.report.failed.extend(batch["failed"])
        path = self.out / shard_name(batch["shard"])
        items = batch["items"]
        if path.is_file() or not items:  # another run finished it meanwhile, or nothing readable
            return {"shard": batch["shard"], "written": 0}
        samples = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            seeds = [sample_seed(self.seed, item.key) for item in chunk]
            images = batch["images"][start:start + self.batch_size].to(self.device)
            videos = self.pipe(images, [item.prompt for item in chunk], seeds, progress=False)
            samples += [generate_sample(item, video, seed, self.settings, self.model_name)
                        for item, video, seed in zip(chunk, videos, seeds)]
        write_shard(path, [encode_sample(sample) for sample in samples])
        self.report.written += len(samples)
        self.report.shards.append(str(path))
        return {"shard": batch["shard"], "written": len(samples)}

    def on_predict_end(self) -> None:
        """Rank 0 writes the job's report: every rank's videos and failures."""
        reports = [self.report]
        if dist.is_available() and dist.is_initialized():
            reports = [None] * dist.get_world_size()
            dist.all_gather_object(reports, self.report)
        if self.trainer.is_global_zero:
            merged = ShardJobReport(written=sum(r.written for r in reports),
                                    skipped_existing=self.trainer.datamodule.skipped_existing,
                                    failed=[f for r in reports for f in r.failed],
                                    shards=sorted(s for r in reports for s in r.shards))
            merged.save(self.out / REPORT_NAME)
            self.report = merged


def predict_trainer(accelerator: str = "auto", devices: int | str | list[int] = 1, num_nodes: int = 1,
                    strategy: str = "auto", progress: bool = True) -> L.Trainer:
    """A Trainer for a writing predict job: no logger, no checkpoints; its bar counts shards."""
    return L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False,
                     enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False)


def generate_shards(model: VideoDiffusionModel | str, inputs: str | Path | list[GenerationInput],
                    out_dir: str | Path, settings: SamplerSettings | None = None, frame_size: int = 256,
                    batch_size: int = 4, seed: int = 0, shard_size: int = 64, border_ratio: float | None = 0.2,
                    background: str = "auto", model_name: str = "", dtype: torch.dtype = torch.float32,
                    trainer: L.Trainer | None = None, num_workers: int = 0,
                    progress: bool = True) -> ShardJobReport:
    """Generate a video per input into `out_dir/shard-NNNNNN.tar` with `trainer.predict` (default: one device,
    the GPU if any); see the module docstring. Returns the job's report on global rank 0, the rank's own on
    the others."""
    settings = settings or SamplerSettings()
    trainer = trainer or predict_trainer(progress=progress)
    generator = VideoGenerator(model, out_dir, settings, batch_size, seed, dtype, model_name)
    generator.network.check_frames(settings.num_frames, frame_size, frame_size)
    data = GenerationDataModule(inputs, out_dir, shard_size, frame_size, border_ratio, background, num_workers)
    try:
        trainer.predict(generator, datamodule=data, return_predictions=False)
    finally:
        data.release()
    return generator.report
