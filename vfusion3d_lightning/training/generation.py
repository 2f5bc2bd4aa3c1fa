"""The data engine's GPU jobs at scale, as `Trainer.predict`: `VideoGenerator.predict_step` writes one planned shard
of orbit videos, `FirstFrameGenerator.predict_step` one batch of first-frame images, so Lightning spreads them
over GPUs and machines (`--trainer.devices`, `--trainer.num_nodes`, SLURM, torchrun) as it spreads training.

Videos:
The plan (`generate_plan.json` in the output folder) deals the inputs to shards once, on global rank 0, before any
rank starts: every rank reads the same plan, so 1 GPU and N GPUs write the same shards, byte for byte (each video's
seed comes from the run seed and its key, each shard's batches are the same). A rerun with the same inputs keeps
the plan and skips complete shards; a killed rank loses only its shard in flight (`.tar.partial`, removed on the
rerun). Inputs that changed get a new plan for the keys not yet in complete shards, numbered after them.

First frames: prompt i is in batch i // batch_size whatever the number of ranks, and its image is seeded by
(run seed, prompt, index), so any number of devices writes the same images; a rerun skips finished prompts.

Captions: global rank 0 deals the objects still to caption by input shard (each object in the first shard that
holds it); a rank captions a shard's objects in batches, appending each batch to that shard's
`captions.part-NNNNNN.jsonl` (fsync'd); at the end (and at the start of a rerun, for a killed run's parts) rank 0
appends the parts to `captions.jsonl` in input order. The captioners are deterministic (beam search, greedy),
so any number of devices writes the same captions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from vfusion3d_lightning.data.captions import (
    CAPTIONS_FILE,
    any_uncaptioned,
    append_records,
    caption_objects,
    finish_captions,
    input_shards,
    plan_captions,
    read_captions_file,
    shard_views,
)
from vfusion3d_lightning.data.first_frames import REPORT_FILE, ImageSettings, is_done, render_images, write_first_frame
from vfusion3d_lightning.data.generate_shards import GenerationInput, generate_sample, read_inputs, sample_seed
from vfusion3d_lightning.data.labels import repair_jsonl_tail
from vfusion3d_lightning.data.preprocess import preprocess
from vfusion3d_lightning.data.schema import (
    ShardJobReport,
    complete_shards,
    encode_sample,
    resume_shard_folder,
    shard_index,
    write_shard,
)
from vfusion3d_lightning.io import atomic_write, folder_lock, remove_partials
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
    start = 1 + max((shard_index(p) for p in complete_shards(out_dir)), default=-1)
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
        if planned.get("idle"):
            return planned
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


IDLE = {"idle": True}  # the one item of a rank dealt nothing: Lightning refuses a rank with no batch if others have


def rank_share(trainer: L.Trainer | None, items: Sequence[Any]) -> list[Any]:
    """The items of this rank: r, r + W, r + 2W, ... (all of them without a trainer); `[IDLE]` if that is none
    while other ranks have some. Dealt here rather than by Lightning's predict sampler, which refuses fewer items
    than ranks."""
    if trainer is None:
        return list(items)
    return list(items[trainer.global_rank::trainer.world_size]) or ([IDLE] if items else [])


class OutputFolderDataModule(L.LightningDataModule):
    """A writing job's data: global rank 0 holds the output folder's lock from `prepare_data` (one deal for every
    machine: the folder is shared) until teardown, or until `release` when the job stops on an error."""

    def __init__(self, out: str | Path):
        super().__init__()
        self.out = Path(out)
        self.prepare_data_per_node = False
        self._lock = contextlib.ExitStack()

    def hold(self, job: str) -> None:
        self._lock.enter_context(folder_lock(self.out, job))

    def teardown(self, stage: str) -> None:
        self.release()

    def release(self) -> None:
        self._lock.close()


class GenerationDataModule(OutputFolderDataModule):
    """Condition images and prompts (a folder, .jsonl or .csv: `data/generate_shards.py`, or the inputs read)
    dealt into planned shards of `out`; holds the folder's lock on global rank 0 while the job runs (`release`
    lets go of it if the job stops on an error)."""

    def __init__(self, inputs: str | Path | list[GenerationInput], out: str | Path, shard_size: int = 64,
                 frame_size: int = 256,
                 border_ratio: float | None = 0.2, background: str = "auto", num_workers: int = 2):
        super().__init__(out)
        self.inputs, self.shard_size = inputs, shard_size
        self.frame_size, self.border_ratio, self.background = frame_size, border_ratio, background
        self.num_workers = num_workers
        self.todo: list[dict[str, Any]] = []
        self.planned = 0
        self.skipped_existing = 0

    def _read(self) -> list[GenerationInput]:
        return self.inputs if isinstance(self.inputs, list) else read_inputs(self.inputs)

    def prepare_data(self) -> None:  # global rank 0, before the other ranks set up
        self.hold("generate")
        make_plan(self._read(), self.out, self.shard_size)

    def setup(self, stage: str) -> None:
        inputs = self._read()
        plan = json.loads((self.out / PLAN_NAME).read_text())["shards"]
        self.todo = [s for s in plan if not (self.out / shard_name(s["shard"])).is_file()]
        self.planned = sum(len(s["keys"]) for s in plan)
        self.skipped_existing = len(inputs) - sum(len(s["keys"]) for s in self.todo)
        self.by_key = {item.key: item for item in inputs}

    def predict_dataloader(self) -> DataLoader:
        shards = PlannedShards(rank_share(self.trainer, self.todo), self.by_key, self.frame_size, self.border_ratio,
                               self.background)
        return DataLoader(shards, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is)


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
        if batch.get("idle"):
            return {"written": 0}
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


def _gather(value: Any) -> list[Any]:
    """`value` of every rank (this one's alone outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# ---------------------------------------------------------------- first frames


class FirstFrameDataModule(OutputFolderDataModule):
    """Prompts in fixed batches of `batch_size` (batch b: prompts b*batch_size ...), with the prompts of each
    that are not finished in `out`; holds the folder's lock on global rank 0 while the job runs."""

    def __init__(self, prompts: Sequence[str], out: str | Path, batch_size: int = 4):
        super().__init__(out)
        self.prompts, self.batch_size = list(prompts), batch_size
        self.batches: list[dict[str, Any]] = []

    def prepare_data(self) -> None:
        self.hold("images")
        remove_partials(self.out)  # a killed run's half-written files

    def setup(self, stage: str) -> None:
        self.batches = []
        for start in range(0, len(self.prompts), self.batch_size):
            indices = [i for i in range(start, min(start + self.batch_size, len(self.prompts)))
                       if not is_done(self.out, i, self.prompts[i])]
            if indices:
                self.batches.append({"indices": indices, "prompts": [self.prompts[i] for i in indices]})

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(rank_share(self.trainer, self.batches), batch_size=None, collate_fn=_as_is)


class FirstFrameGenerator(L.LightningModule):
    """A diffusers text-to-image pipeline (loaded on the rank's device when the job starts) writing one batch of
    `<index>.png` + `<index>.txt` a predict step."""

    def __init__(self, load_pipeline: Callable[[torch.device], Any], out: str | Path, settings: ImageSettings):
        super().__init__()
        self.load_pipeline, self.out, self.settings = load_pipeline, Path(out), settings
        self.written = 0

    def on_predict_start(self) -> None:
        self.pipeline = self.load_pipeline(self.device)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> int:
        if batch.get("idle"):
            return 0
        images = render_images(self.pipeline, batch["prompts"], batch["indices"], self.settings, self.device)
        for index, image, prompt in zip(batch["indices"], images, batch["prompts"], strict=True):
            write_first_frame(self.out, index, image, prompt)
        self.written += len(images)
        return len(images)


def make_first_frames(prompts: Sequence[str], out_dir: str | Path, load_pipeline: Callable[[torch.device], Any],
                      settings: ImageSettings, batch_size: int = 4, model_name: str = "",
                      trainer: L.Trainer | None = None, progress: bool = True) -> dict:
    """Write `<index>.png` + `<index>.txt` for every prompt not yet done with `trainer.predict` (default: one device,
    the GPU if any), then `images_report.json` (global rank 0); returns the report.

    Args:
        prompts: the prompts; prompt i is written as `{i:06d}.png` and `{i:06d}.txt`.
        out_dir: the output folder.
        load_pipeline: device -> a diffusers text-to-image pipeline on it, called only when a prompt is pending
            (a finished rerun never loads the model).
        settings: suffix, negative prompt, steps, guidance, size and run seed.
        batch_size: prompts per pipeline call.
        model_name: recorded in the report.
        trainer: the Trainer that runs the job (its devices, nodes and strategy spread the batches).
        progress: show Lightning's bar (of batches) when no trainer is given.
    """
    settings.check()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    data = FirstFrameDataModule(prompts, out_dir, batch_size)
    pending = sum(not is_done(out_dir, i, prompt) for i, prompt in enumerate(prompts))
    generator = FirstFrameGenerator(load_pipeline, out_dir, settings)
    global_zero = True
    if pending:
        trainer = run_predict(generator, data, trainer, progress)
        written, global_zero = sum(_gather(generator.written)), trainer.is_global_zero
    else:
        written = 0
    report = {"model": model_name, "prompts": len(prompts), "written": written,
              "skipped_existing": len(prompts) - pending, "seconds": round(time.perf_counter() - started, 3),
              "batch_size": batch_size, "settings": asdict(settings)}
    if global_zero:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / REPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n", "utf-8"))
    return report


# ---------------------------------------------------------------- captions

PART_PATTERN = "captions.part-*.jsonl"
CAPTIONS_PLAN = "captions_plan.json"  # the job's deal of objects to ranks; removed when the job ends


def merge_caption_parts(out_dir: Path) -> None:
    """Append the records of every `captions.part-NNNNNN.jsonl` (a whole record a line; a line cut by a kill is
    dropped) to `captions.jsonl`, in part order, and remove the parts."""
    parts = sorted(out_dir.glob(PART_PATTERN))
    if not parts:
        return
    main = out_dir / CAPTIONS_FILE
    repair_jsonl_tail(main)
    known = set(read_captions_file(main))
    for part in parts:
        repair_jsonl_tail(part)
        records = [r for r in read_captions_file(part).values() if r["object_id"] not in known]
        append_records(main, records)
        known |= {r["object_id"] for r in records}
    for part in parts:  # only once all are on file: a kill before this merges them again, without repeats
        part.unlink()


class CaptionDataModule(OutputFolderDataModule):
    """Objects to caption, one input shard an item (see the module docstring); holds the output folder's lock on
    global rank 0 while the job runs."""

    def __init__(self, shard_folders: Sequence[str | Path], out: str | Path, views: int = 8):
        super().__init__(out)
        self.shards, self.views = input_shards(shard_folders), views
        self.plan: list[dict[str, Any]] = []

    def pending(self) -> list[dict[str, Any]]:
        return plan_captions(self.shards, set(read_captions_file(self.out / CAPTIONS_FILE)))

    def any_pending(self) -> bool:
        """Whether `pending()` has anything, reading the shards only up to the first object to caption."""
        return any_uncaptioned(self.shards, set(read_captions_file(self.out / CAPTIONS_FILE)))

    def prepare_data(self) -> None:
        self.hold("captions")
        remove_partials(self.out)  # what a killed run left half-written
        merge_caption_parts(self.out)
        text = json.dumps(self.pending(), indent=1)
        atomic_write(self.out / CAPTIONS_PLAN, lambda tmp: tmp.write_text(text))

    def setup(self, stage: str) -> None:
        self.plan = json.loads((self.out / CAPTIONS_PLAN).read_text())

    def predict_dataloader(self) -> DataLoader:
        items = [{"index": i, **planned} for i, planned in enumerate(self.plan)]
        return DataLoader(rank_share(self.trainer, items), batch_size=None, collate_fn=_as_is)


class CaptionGenerator(L.LightningModule):
    """A view captioner and an LLM summariser (loaded on the rank's device when the job starts) captioning one
    input shard's planned objects a predict step, `batch_size` objects a captioner call."""

    def __init__(self, load_captioner: Callable[[torch.device], Any], load_summarizer: Callable[[torch.device], Any],
                 out: str | Path, views: int = 8, batch_size: int = 8):
        super().__init__()
        self.load_captioner, self.load_summarizer = load_captioner, load_summarizer
        self.out, self.views, self.batch_size = Path(out), views, batch_size
        self.captioned = 0
        self.models = None

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> int:
        if batch.get("idle"):
            return 0
        self.models = self.models or (self.load_captioner(self.device), self.load_summarizer(self.device))
        part = self.out / f"captions.part-{batch['index']:06d}.jsonl"
        objects = batch["objects"]
        views = shard_views(batch["shard"], objects, self.views)
        for start in range(0, len(objects), self.batch_size):
            records = caption_objects(views[start:start + self.batch_size], objects[start:start + self.batch_size],
                                      *self.models)
            append_records(part, records)
            self.captioned += len(records)
        return len(objects)


def caption_shards(shard_folders: Sequence[str | Path], out_dir: str | Path,
                   load_captioner: Callable[[torch.device], Any], load_summarizer: Callable[[torch.device], Any],
                   views: int = 8, batch_size: int = 8, trainer: L.Trainer | None = None, progress: bool = True,
                   models: dict[str, str] | None = None) -> dict:
    """Caption every object of the shards with `trainer.predict` (default: one device, the GPU if any; resumable),
    then global rank 0 writes the captioned copies of the shards, prompts.txt and captions_report.json under
    `out_dir` (data/captions.py); returns the report.

    Args:
        shard_folders: folders of multi-view shards (`shard-NNNNNN.tar`), with different names. An object
            (by `object_id`) in several of them is captioned once, from the first that holds it.
        out_dir: the output folder: captions.jsonl, <folder name>/shard-*.tar, prompts.txt, captions_report.json.
        load_captioner: device -> (views (N, H, W, 4) uint8 -> N captions); called only if an object needs one.
        load_summarizer: device -> (N lists of view captions -> N raw summaries); likewise.
        views: views captioned per object, spread evenly over its views (Cap3D renders 8 around the object).
        batch_size: objects per batch (the captioner gets batch_size x views images at a time).
        trainer: the Trainer that runs the job (its devices, nodes and strategy spread the shards).
        progress: show progress bars.
        models: names of the models, for the report.
    """
    if views < 1 or batch_size < 1:
        raise ValueError(f"need views >= 1 and batch_size >= 1, got views={views}, batch_size={batch_size}")
    out_dir = Path(out_dir)
    data = CaptionDataModule(shard_folders, out_dir, views)
    generator = CaptionGenerator(load_captioner, load_summarizer, out_dir, views, batch_size)
    captioned, global_zero = 0, True
    if list(out_dir.glob(PART_PATTERN)) or data.any_pending():  # the job's plan reads every shard once
        trainer = run_predict(generator, data, trainer, progress)
        captioned, global_zero = sum(_gather(generator.captioned)), trainer.is_global_zero
    if not global_zero:
        return {}
    with folder_lock(out_dir, "captions"):
        merge_caption_parts(out_dir)
        (out_dir / CAPTIONS_PLAN).unlink(missing_ok=True)
        return finish_captions(data.shards, out_dir, captioned, views, models, progress)


# ---------------------------------------------------------------- Trainer


def predict_trainer(accelerator: str = "auto", devices: int | str | list[int] = 1, num_nodes: int = 1,
                    strategy: str = "auto", progress: bool = True) -> L.Trainer:
    """A Trainer for a writing predict job: no logger, no checkpoints; its bar counts shards."""
    return L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False,
                     enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                     use_distributed_sampler=False)  # the data modules deal the work (rank_share)


def run_predict(module: L.LightningModule, data: L.LightningDataModule, trainer: L.Trainer | None,
                progress: bool) -> L.Trainer:
    """`trainer.predict` (default: one device, the GPU if any) of a writing job; the data's folder lock is let go
    of however the job ends. A Trainer of your own needs `use_distributed_sampler=False` (as `predict_trainer`
    makes it): the data modules deal the work to the ranks themselves."""
    trainer = trainer or predict_trainer(progress=progress)
    try:
        trainer.predict(module, datamodule=data, return_predictions=False)
    finally:
        data.release()
    return trainer


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
    generator = VideoGenerator(model, out_dir, settings, batch_size, seed, dtype, model_name)
    generator.network.check_frames(settings.num_frames, frame_size, frame_size)
    data = GenerationDataModule(inputs, out_dir, shard_size, frame_size, border_ratio, background, num_workers)
    trainer = run_predict(generator, data, trainer, progress)
    # gathered here, not in a hook: Lightning skips the hooks of a rank that was dealt nothing
    reports = _gather(generator.report)
    if not trainer.is_global_zero:
        return generator.report
    merged = ShardJobReport(written=sum(r.written for r in reports), skipped_existing=data.skipped_existing,
                            failed=[f for r in reports for f in r.failed],
                            shards=sorted(s for r in reports for s in r.shards))
    merged.save(Path(out_dir) / REPORT_NAME)
    return merged
