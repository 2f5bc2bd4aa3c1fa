"""The whole VFusion3D system as one resumable command: `vfusion3d-lightning pipeline --config CONFIG.yaml`.

Stages, in the order of the system's data flow, each in the folder of the run folder named after it:

    assets         procedural 3D assets (or the user's folders), training and held-out
    render         orbit16 renders (video model, elevation MLP), random32 sets (LRM fine-tune), orbit16 and
                   uniform32 held out
    captions       Cap3D captions of the assets: view captions summarised by an LLM, into the renders' prompts
    prompts        web captions (or procedural ones) kept where an LLM answers "single object"
    images         a first frame per prompt (the kept captions and the assets' captions) by text-to-image
    video          fine-tune the video model's temporal layers on the captioned orbits (LightningCLI fit)
    generate       orbit videos from the first frames + prompts
    features       DINO features of the generated videos and the orbit renders (LightningCLI predict)
    quality        the quality SVM: from a labels file, or from automatic labels (renders vs spoiled renders)
    filter         keep the videos the SVM scores as good
    elevation      the elevation MLP on the orbit renders (LightningCLI fit)
    label          elevation + orbit cameras and masks into the kept videos
    lrm_pretrain   the LRM on the labelled synthetic videos, multi-stage (LightningCLI fit)
    lrm_finetune   the LRM on 3D renders with L2 added, from the pre-trained weights (LightningCLI fit)
    evaluate       PSNR/SSIM/LPIPS and CLIP image/text similarity of both LRMs on the held-out objects, and
                   report.html: their renders, turntables and meshes next to the ground truth
    export         turntable GIFs and meshes for sample held-out images

A stage that finishes writes `stage.json` (its config, the digests of its inputs, the digest of its outputs);
a rerun skips a stage whose record matches, and redoes it (and so everything after it) otherwise, its old
folder moved to `<folder>.previous`. Folders are named by stage, not by position, so adding a stage leaves the
finished stages of an existing run valid. A killed stage has no record, so the rerun starts there; rendering,
generation, feature caching, filter and label skip the shards they finished, and training resumes from its last
checkpoint.

Model sources may be `tiny-random`: a tiny randomly initialised model of that kind, built once in
`<run_dir>/tiny-random/` (`models/tiny_random.py`), so that the quickstart runs every stage with no downloads;
its outputs mean nothing.

Each stage calls the same typed function as its command (`commands/render.py`, `generate.py`, ...), and the
LightningCLI stages take `overrides:` in LightningCLI's dotted keys, the syntax of every command line here.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jsonargparse.typing import Path_fr

from vfusion3d_lightning.data.procedural import AssetStyle
from vfusion3d_lightning.io import atomic_write, folder_lock, remove_partials
from vfusion3d_lightning.training.lightning_cli import lightning_cli

RECORD = "stage.json"


# ---------------------------------------------------------------- configuration


@dataclass
class LightningRun:
    """A LightningCLI run. The pipeline sets the data paths, `trainer.default_root_dir` and what links stages
    (checkpoints, feature tags).

    Args:
        config: LightningCLI config file; relative to the pipeline config that names it.
        overrides: LightningCLI keys and values, e.g. `{model.init_args.lr: 1.0e-4, trainer.max_epochs: 2}`.
    """

    config: Path_fr | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class AssetsConfig:
    """The 3D assets.

    Args:
        folder: your 3D assets (.glb/.gltf/.obj/.ply); null: procedural ones.
        held_out_folder: your held-out assets (evaluation and samples); needed with `folder`.
        count: procedural training assets.
        held_out: procedural held-out assets.
        real: real meshes added to the procedural held-out set, by name from our registry set (`eval-set`;
            bunny, teapot, ant and nut ship with the package, the others are fetched from their registries).
            Their geometry scores are the ones to compare; with your own held_out_folder, run `eval-set --out`
            into it instead.
        style: procedural style: `upright` assets show their elevation in views, `tumbled` ones do not; `solid`
            ones (one upright primitive of one colour) are what a tiny LRM learns shapes from in minutes.
    """

    folder: str | None = None
    held_out_folder: str | None = None
    count: int = 100
    held_out: int = 8
    real: list[str] = field(default_factory=list)
    style: AssetStyle = "upright"


@dataclass
class RenderConfig:
    """The orbit16, random32 and uniform32 renders.

    Args:
        resolution: image size in pixels.
        workers: rendering processes.
        shard_size: samples per shard.
    """

    resolution: int = 64
    workers: int = 2
    shard_size: int = 16


TINY_RANDOM = "tiny-random"  # a model source: a tiny random model built in the run folder (see the module doc)
LLAMA_2_13B = "meta-llama/Llama-2-13b-chat-hf"


@dataclass
class CaptionsConfig:
    """Cap3D captions of the training and held-out assets, from their renders (see the captions command).

    Args:
        captioner: image-to-text model folder or hub id in the local cache (Cap3D: BLIP-2); or `tiny-random`.
        llm: causal LM that summarises the view captions (Cap3D: GPT-4; here the prompt filter's kind of model,
            the paper's Llama-2-13B chat by default); or `tiny-random`.
        views: views captioned per object (Cap3D: 8).
        batch_size: images per captioner call.
    """

    captioner: str = "Salesforce/blip2-opt-2.7b"
    llm: str = LLAMA_2_13B
    views: int = 8
    batch_size: int = 8


@dataclass
class PromptsConfig:
    """Object-centric prompts: captions an LLM judges to describe a single object (see the prompts command).

    Args:
        captions: caption files (.txt a line each, .jsonl or .csv with a `caption` field); null: `count` procedural
            web-like captions, single objects and scenes mixed (data/prompts.py).
        count: procedural captions.
        model: causal LM folder or hub id in the local cache (the paper: Llama-2-13B chat); or `tiny-random`.
        batch_size: captions per generate call.
    """

    captions: list[str] | None = None
    count: int = 96
    model: str = LLAMA_2_13B
    batch_size: int = 16


@dataclass
class ImagesConfig:
    """A first frame per prompt, by a text-to-image model (see the images command).

    Args:
        model: a diffusers text-to-image pipeline folder or hub id in the local cache; or `tiny-random`.
        asset_captions: prompt with the assets' captions too (the paper's prompts are web captions plus Cap3D
            captions of 3D assets).
        max_prompts: use the first N prompts only; null: all.
        size: image size in pixels.
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        batch_size: prompts per pipeline call.
    """

    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    asset_captions: bool = True
    max_prompts: int | None = None
    size: int = 512
    steps: int = 30
    guidance: float = 7.5
    batch_size: int = 4


@dataclass
class GenerateConfig:
    """Orbit videos from condition images and prompts.

    Args:
        inputs: your own condition images instead of the images stage's: a folder of images (+ same-stem .txt
            prompts) or a .jsonl/.csv with `image` and `prompt` fields.
        frames: frames per video.
        size: frame size in pixels.
        steps: denoising steps.
        guidance: classifier-free guidance of the first and last frames.
        batch_size: videos per sampler call.
        shard_size: videos per shard.
    """

    inputs: str | None = None
    frames: int = 16
    size: int = 32
    steps: int = 4
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0])
    batch_size: int = 8
    shard_size: int = 16


@dataclass
class QualityConfig:
    """The quality SVM.

    Args:
        labels: a labels file (label-ui) over the generated videos; null: automatic labels (renders as good,
            spoiled renders as bad).
        threshold: keep videos with P(good) at or above this.
        run: its LightningCLI run.
    """

    labels: str | None = None
    threshold: float = 0.5
    run: LightningRun = field(default_factory=LightningRun)


@dataclass
class LabelConfig:
    """Masks and orbit cameras of the kept videos.

    Args:
        masks: `threshold`: objects on white (offline); `rembg`: a saliency model (weights local).
        mask_tolerance: threshold masks: how far from white a background pixel may be.
        radius: camera distance of the orbit, as rendered.
    """

    masks: Literal["threshold", "rembg"] = "threshold"
    mask_tolerance: int = 12
    radius: float = 1.5


@dataclass
class EvaluateConfig:
    """Held-out metrics of both LRMs (see the evaluate command).

    Args:
        max_objects: evaluate the first N objects only.
        clip: CLIP folder or hub id in the local cache, or `tiny-random`; `none` skips the CLIP metrics.
        lpips_weights: torchvision VGG16 weights for LPIPS (default: the torch hub cache).
        lpips_random_backbone: an untrained LPIPS trunk: for tests and demos only.
        render_size: render and compare at this size (default: the shards' resolution).
        input_size: encoder input size in pixels.
        views_per_batch: views rendered per call.
        mesh_resolution: density grid size per axis of the meshes compared with the held-out assets (auto: 256 on
            a GPU, 128 on a CPU).
        mesh_threshold: density level of their surface (the released 1.0); null: each object's grid median.
        mesh_points: points sampled on each surface for Chamfer and F-score (the field's 10,000).
    """

    max_objects: int | None = None
    clip: str = "none"
    lpips_weights: str | None = None
    lpips_random_backbone: bool = False
    render_size: int | None = None
    input_size: int = 512
    views_per_batch: int = 8
    mesh_resolution: int | None = None
    mesh_threshold: float | None = 1.0
    mesh_points: int = 10_000


@dataclass
class ExportConfig:
    """Turntables and meshes of sample held-out images.

    Args:
        images: how many held-out images.
        frames: turntable frames.
        render_size: turntable frame size in pixels.
        input_size: encoder input size in pixels.
        mesh_resolution: density grid size per axis.
        mesh_threshold: density level of the surface (the released 1.0); null: the grid's median density, for a
            briefly trained model whose density has not reached the released scale (a rough blob, but the path
            runs).
        video_format: turntable file format.
        mesh_format: mesh file format.
    """

    images: int = 2
    frames: int = 24
    render_size: int = 64
    input_size: int = 512
    mesh_resolution: int = 64
    mesh_threshold: float | None = 1.0
    video_format: Literal["gif", "mp4"] = "gif"
    mesh_format: Literal["glb", "obj", "ply"] = "glb"


@dataclass
class PipelineConfig:
    run_dir: str = "outputs/pipeline"
    seed: int = 0
    device: str = "cpu"
    assets: AssetsConfig = field(default_factory=AssetsConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    video: LightningRun = field(default_factory=LightningRun)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    features: LightningRun = field(default_factory=LightningRun)
    quality: QualityConfig = field(default_factory=QualityConfig)
    elevation: LightningRun = field(default_factory=LightningRun)
    label: LabelConfig = field(default_factory=LabelConfig)
    lrm_pretrain: LightningRun = field(default_factory=LightningRun)
    lrm_finetune: LightningRun = field(default_factory=LightningRun)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ---------------------------------------------------------------- records


def digest_paths(paths: list[Path]) -> str:
    """A digest of files (and folders' files): names, sizes and modification times; cheap at any scale."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            if file.name == RECORD or file.name.startswith("."):
                continue
            stat = file.stat()
            digest.update(f"{file}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class Stage:
    name: str
    run: Callable[["Pipeline", Path], dict[str, Any]]  # (pipeline, stage folder) -> outputs and counts
    inputs: tuple[str, ...]  # earlier stages whose outputs it reads
    config: Callable[[PipelineConfig], Any]  # the part of the config it depends on


class Pipeline:
    def __init__(self, config: PipelineConfig, progress: bool = True):
        self.config, self.progress = config, progress
        self.run_dir = Path(config.run_dir)
        self.records: dict[str, dict[str, Any]] = {}

    def folder(self, stage: str) -> Path:
        return self.run_dir / stage

    def output(self, stage: str, name: str) -> Any:
        return self.records[stage]["outputs"][name]

    def run(self) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_partials(self.run_dir)  # the pipeline holds run_dir: nothing else is writing these
        if removed:
            print(f"removed {removed} half-written file(s) that a killed run left in {self.run_dir}", flush=True)
        started = time.time()
        for number, stage in enumerate(STAGES, 1):
            folder = self.folder(stage.name)
            expected = {"config": _plain(stage.config(self.config)),
                        "inputs": {name: self.records[name]["digest"] for name in stage.inputs}}
            record = _read_record(folder)
            if record is not None and {k: record[k] for k in expected} == expected:
                self.records[stage.name] = record
                print(f"[{number}/{len(STAGES)}] {stage.name}: done before, skipped", flush=True)
                continue
            if record is not None:  # done with another config or other inputs: start it afresh
                _set_aside(folder)
            print(f"[{number}/{len(STAGES)}] {stage.name} ...", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            begin = time.time()
            outputs = stage.run(self, folder)
            record = {**expected, "stage": stage.name, "outputs": outputs, "seconds": round(time.time() - begin, 1),
                      "digest": digest_paths([folder, *_paths_in(outputs)])}
            atomic_write(folder / RECORD, lambda tmp, text=json.dumps(record, indent=2): tmp.write_text(text))
            self.records[stage.name] = record
            print(f"[{number}/{len(STAGES)}] {stage.name}: done in {record['seconds']:.0f} s", flush=True)
        return self.write_summary(time.time() - started)

    def write_summary(self, seconds: float) -> dict[str, Any]:
        outputs = {name: record["outputs"] for name, record in self.records.items()}
        summary = {"run_dir": str(self.run_dir), "seconds_this_run": round(seconds, 1),
                   "stage_seconds": {name: record["seconds"] for name, record in self.records.items()},
                   "outputs": outputs}
        metrics_table = Path(self.output("evaluate", "summary")).read_text()
        lines = [f"# Pipeline run {self.run_dir}", "", "| stage | seconds | result |", "| --- | --- | --- |"]
        for name, record in self.records.items():
            counts = ", ".join(f"{k} {v}" for k, v in record["outputs"].items() if isinstance(v, (int, float)))
            lines.append(f"| {name} | {record['seconds']:.0f} | {counts} |")
        lines += ["", "## Held-out metrics", "", metrics_table.strip(), "",
                  goal_line(Path(self.output("evaluate", "summary")).parent / "finetuned" / "objects.csv"),
                  "", "## Outputs", ""]
        for name in ("video_checkpoint", "quality_svm", "elevation_mlp", "pretrained", "finetuned", "report"):
            for stage_outputs in outputs.values():
                if name in stage_outputs:
                    lines.append(f"- {name}: {stage_outputs[name]}")
        lines += [f"- sample: {path}" for path in self.output("export", "files")]
        text = "\n".join(lines) + "\n"
        atomic_write(self.run_dir / "summary.md", lambda tmp: tmp.write_text(text))
        atomic_write(self.run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        print(text)
        return summary


GOAL_PSNR_GAIN, GOAL_OPACITY_IOU = 3.0, 0.5  # dB over the constant background; IoU: a recognisable object


def goal_line(objects_csv: Path) -> str:
    """Whether the fine-tuned LRM beats the trivial prediction on the held-out objects (its objects.csv): mean
    PSNR gain over the constant background >= GOAL_PSNR_GAIN dB and mean opacity IoU >= GOAL_OPACITY_IOU."""
    import csv

    with objects_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    gain = float(np.mean([float(r["psnr"]) - float(r["baseline_psnr"]) for r in rows]))
    iou = float(np.mean([float(r["opacity_iou"]) for r in rows]))

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return (f"Goal (fine-tuned LRM, held-out): PSNR {gain:+.2f} dB over the constant background (goal >= "
            f"+{GOAL_PSNR_GAIN:g} dB: {verdict(gain >= GOAL_PSNR_GAIN)}); opacity IoU {iou:.3f} (goal >= "
            f"{GOAL_OPACITY_IOU:g}: {verdict(iou >= GOAL_OPACITY_IOU)}).")


def _plain(value: Any) -> Any:
    """A stage's part of the config as JSON types, for its record."""
    if hasattr(value, "__dataclass_fields__"):
        value = asdict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value))


def _set_aside(folder: Path) -> None:
    """Move an outdated stage's folder to `<folder>.previous` (replacing an older one) rather than delete it:
    it may hold hours of training."""
    import shutil

    previous = folder.with_name(folder.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    folder.rename(previous)
    print(f"  {folder.name} was made with another config or other inputs; moved to {previous}", flush=True)


def _read_record(folder: Path) -> dict[str, Any] | None:
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _paths_in(outputs: dict[str, Any]) -> list[Path]:
    """Output paths that live outside the stage's folder (feature caches beside other stages' shards)."""
    paths = outputs.get("external", [])
    return [Path(p) for p in paths if Path(p).exists()]


# ---------------------------------------------------------------- LightningCLI stages


def _override_args(overrides: dict[str, Any]) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _lightning(command: str, run: LightningRun, root: Path, settings: dict[str, Any], resume: bool = False):
    """Run LightningCLI `command` on `run.config` with the user's overrides, then the pipeline's `settings`;
    returns the LightningCLI object (model, datamodule, trainer)."""
    args = ["--config", str(run.config), *_override_args(run.overrides), *_override_args(settings),
            "--trainer.default_root_dir", str(root)]
    last = _newest(root, "last.ckpt") if resume else None
    if last is not None:  # a killed run goes on from its last checkpoint
        args += ["--ckpt_path", str(last)]
    return lightning_cli([command, *args], overwrite_config=True)  # a rerun writes config.yaml again


def _newest(root: Path, name: str) -> Path | None:
    found = sorted(root.rglob(name), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _fitted_checkpoint(root: Path) -> str:
    last = _newest(root, "last.ckpt")
    if last is None:
        raise RuntimeError(f"training under {root} wrote no last.ckpt; keep a ModelCheckpoint with save_last: true "
                           "in its config")
    return str(last)


# ---------------------------------------------------------------- stages


# procedural file names: the stem is the object id, which must differ between the sets (captions are per id)
ASSET_PREFIXES = {"train": "asset", "held_out": "held_out"}


def stage_assets(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.procedural import procedural
    from vfusion3d_lightning.data.eval_sets import REAL_PREFIX, install_real
    from vfusion3d_lightning.data.render_shards import find_assets, sample_key

    cfg = pipe.config.assets
    if cfg.folder:
        if not cfg.held_out_folder:
            raise ValueError("assets.folder needs assets.held_out_folder too (held-out objects for evaluation)")
        if cfg.real:
            raise ValueError("assets.real adds registry meshes to the procedural held-out set; with your own "
                             f"held_out_folder, install them there: vfusion3d-lightning eval-set --out "
                             f"{cfg.held_out_folder} --objects {' '.join(cfg.real)}")
        train, held_out = Path(cfg.folder), Path(cfg.held_out_folder)
    else:
        train, held_out = folder / "train", folder / "held_out"
        seed = pipe.config.seed
        procedural(train, cfg.count, seed=seed * 1_000_003, style=cfg.style, prefix=ASSET_PREFIXES["train"],
                   progress=pipe.progress)
        procedural(held_out, cfg.held_out, seed=seed * 1_000_003 + 500_000, style=cfg.style,
                   prefix=ASSET_PREFIXES["held_out"], progress=pipe.progress)
        wanted = {f"{REAL_PREFIX}_{name}.glb" for name in cfg.real}
        for stale in held_out.glob(f"{REAL_PREFIX}_*.glb"):  # our own folder: objects dropped from the list go
            if stale.name not in wanted:
                stale.unlink()
        if cfg.real:
            install_real(held_out, cfg.real, progress=pipe.progress)
    counts = {"train_assets": len(find_assets(train)), "held_out_assets": len(find_assets(held_out))}
    if not counts["train_assets"] or not counts["held_out_assets"]:
        raise ValueError(f"no assets in {train} or {held_out}")
    shared = {sample_key(p) for p in find_assets(train)} & {sample_key(p) for p in find_assets(held_out)}
    if shared:  # object ids: a held-out object would take a training object's caption, and be trained on
        raise ValueError(f"{len(shared)} held-out assets have the name of a training asset (e.g. "
                         f"{sorted(shared)[0]!r}); rename them in {held_out}, or remove them from {train}")
    return {"train": str(train), "held_out": str(held_out), **counts}



# name -> (assets, views): what each render serves is in the module doc
RENDER_JOBS = {"orbit16": ("train", "orbit16"), "set32": ("train", "random32"), "held_out16": ("held_out", "orbit16"),
               "held_out32": ("held_out", "uniform32")}


def stage_render(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.render import render

    cfg, seed = pipe.config.render, pipe.config.seed
    outputs: dict[str, Any] = {}
    for name, (assets, views) in RENDER_JOBS.items():
        report = render(Path(pipe.output("assets", assets)), folder / name, views=views, resolution=cfg.resolution,
                        seed=seed, workers=cfg.workers, shard_size=cfg.shard_size, progress=pipe.progress)
        if report.failed:
            print(f"  {name}: {len(report.failed)} assets failed to render (see {folder / name}/render_report.json)")
        outputs[name] = str(folder / name)
        outputs[f"{name}_objects"] = report.written + report.skipped_existing
    return outputs


def model_source(pipe: Pipeline, source: str, kind: str) -> str:
    """`source` as given, or for `tiny-random` the folder of a tiny random model of `kind`, built once."""
    if source != TINY_RANDOM:
        return source
    from vfusion3d_lightning.data.prompts import procedural_caption_words
    from vfusion3d_lightning.models import tiny_random

    folder = pipe.run_dir / TINY_RANDOM / kind
    seed = pipe.config.seed
    builders = {"llm": lambda: tiny_random.build_tiny_llm(folder, seed, words=procedural_caption_words()),
                "captioner": lambda: tiny_random.build_tiny_captioner(folder, seed),
                "text_to_image": lambda: tiny_random.build_tiny_text_to_image(folder, seed),
                "clip": lambda: tiny_random.build_tiny_clip(folder, seed)}
    return str(builders[kind]())


def stage_captions(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.captions import captions
    from vfusion3d_lightning.commands.common import PredictOptions

    cfg = pipe.config.captions
    names = ("orbit16", "held_out16", "held_out32")
    report = captions([Path(pipe.output("render", name)) for name in names], folder,
                      captioner=model_source(pipe, cfg.captioner, "captioner"), llm=model_source(pipe, cfg.llm, "llm"),
                      views=cfg.views, batch_size=cfg.batch_size,
                      trainer=PredictOptions.from_device(pipe.config.device), progress=pipe.progress)
    return {**{name: str(folder / name) for name in names}, "prompts_file": str(folder / "prompts.txt"),
            "captioned_objects": report["objects"]}


def stage_prompts(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.prompts import prompts
    from vfusion3d_lightning.data.prompts import PROMPTS_FILE, procedural_captions

    cfg = pipe.config.prompts
    sources = [Path(f) for f in cfg.captions or []]
    if not sources:
        sources = [folder / "web_captions.txt"]
        text = "".join(f"{caption}\n" for caption in procedural_captions(cfg.count, pipe.config.seed))
        atomic_write(sources[0], lambda tmp: tmp.write_text(text, "utf-8"))
    report = prompts(sources, model_source(pipe, cfg.model, "llm"), folder, batch_size=cfg.batch_size,
                     device=pipe.config.device)
    return {"prompts_file": str(folder / PROMPTS_FILE), "captions": report["captions"]["read"],
            "single_object": report["single_object"], "not_single_object": report["not_single_object"],
            "unparsed": report["unparsed"]}


def stage_images(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.common import PredictOptions
    from vfusion3d_lightning.commands.images import images

    cfg = pipe.config.images
    sources = [pipe.output("prompts", "prompts_file")]
    if cfg.asset_captions:
        sources.append(pipe.output("captions", "prompts_file"))
    # the web prompts and the assets' captions taken in turn, so that max_prompts keeps both kinds
    lists = [Path(source).read_text("utf-8").splitlines() for source in sources]
    merged = [line for row in zip_longest(*lists) for line in row if line]
    prompts_file = folder / "prompts.txt"
    atomic_write(prompts_file, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in merged), "utf-8"))
    report = images(prompts_file, model_source(pipe, cfg.model, "text_to_image"), folder / "images",
                    steps=cfg.steps, guidance=cfg.guidance, size=cfg.size, batch_size=cfg.batch_size,
                    seed=pipe.config.seed, max_prompts=cfg.max_prompts,
                    trainer=PredictOptions.from_device(pipe.config.device), progress=pipe.progress)
    return {"images": str(folder / "images"), "prompts": report["prompts"],
            "written": report["written"] + report["skipped_existing"]}


def _samples(folder: str, select=None) -> list:
    """The samples of a stage's shard folder, in order; `select` picks views as decode_sample's does."""
    from vfusion3d_lightning.data.schema import complete_shards, read_samples

    return list(read_samples(complete_shards(folder), select))


def _shards(folder: str) -> str:
    return str(Path(folder) / "shard-*.tar")


def stage_video(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    # captioned orbits: the image+text backbone learns from both; validation on held-out objects
    _lightning("fit", pipe.config.video, folder, {
        "data.init_args.train_shards": _shards(pipe.output("captions", "orbit16")),
        "data.init_args.val_shards": _shards(pipe.output("captions", "held_out16"))}, resume=True)
    return {"video_checkpoint": _fitted_checkpoint(folder)}


def stage_generate(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.common import PredictOptions
    from vfusion3d_lightning.commands.generate import generate

    cfg = pipe.config.generate
    source = cfg.inputs or pipe.output("images", "images")
    report = generate(pipe.output("video", "video_checkpoint"), Path(source), folder / "videos", frames=cfg.frames,
                      size=cfg.size, steps=cfg.steps, guidance=cfg.guidance, batch_size=cfg.batch_size,
                      shard_size=cfg.shard_size, seed=pipe.config.seed, border_ratio=None, background="white",
                      trainer=PredictOptions.from_device(pipe.config.device), num_workers=0, progress=pipe.progress)
    return {"videos": str(folder / "videos"), "generated": report.written + report.skipped_existing,
            "failed": len(report.failed)}



def _encode(pipe: Pipeline, shard_folder: str, root: Path) -> str:
    """Cache features beside the shards of `shard_folder` (skipping cached shards); returns the feature tag."""
    cli = _lightning("predict", pipe.config.features, root, {"data.init_args.shards": shard_folder})
    return cli.model.tag


def _caches(folder: str, tag: str) -> list[str]:
    return [str(p) for p in sorted(Path(folder).glob(f"*.features-{tag}.safetensors"))]


def stage_features(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    tag = ""
    for shard_folder in (pipe.output("generate", "videos"), pipe.output("render", "orbit16")):
        tag = _encode(pipe, shard_folder, folder)
    external = _caches(pipe.output("generate", "videos"), tag) + _caches(pipe.output("render", "orbit16"), tag)
    return {"feature_tag": tag, "external": external}


def _automatic_labels(pipe: Pipeline, folder: Path) -> tuple[str, str]:
    """Good: the orbit renders; bad: spoiled copies of them (data/spoil.py). Returns (shard folder, labels)."""
    from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter, complete_shards
    from vfusion3d_lightning.data.spoil import SPOIL_KINDS, spoil_video

    videos, labels = folder / "labelled", folder / "labels.jsonl"
    good = sorted(_samples(pipe.output("render", "orbit16")), key=lambda sample: sample.key)  # any shard layout
    rng = np.random.default_rng(pipe.config.seed)
    lines = []
    if not complete_shards(videos):
        with ShardWriter(videos, maxcount=pipe.config.render.shard_size) as writer:
            for i, sample in enumerate(good):
                bad = spoil_video(sample.images, good[(i + 1) % len(good)].images, SPOIL_KINDS[i % 4], rng)
                for key, images in ((f"good_{sample.key}", sample.images), (f"bad_{sample.key}", bad)):
                    writer.write_sample(MultiViewSample(key=key, object_id=sample.object_id, source="synthetic",
                                                        images=images))
    for sample in good:
        lines += [json.dumps({"key": f"good_{sample.key}", "label": 1}), json.dumps({"key": f"bad_{sample.key}",
                                                                                     "label": 0})]
    atomic_write(labels, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return str(videos), str(labels)


def stage_quality(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    cfg, tag = pipe.config.quality, pipe.output("features", "feature_tag")
    if cfg.labels:
        videos, labels = pipe.output("generate", "videos"), cfg.labels
        if not Path(labels).is_file():
            raise FileNotFoundError(f"no quality labels at {labels}: label the generated videos (vfusion3d-lightning "
                                    f"label-ui {videos} --labels {labels}), then run the pipeline again")
    else:
        videos, labels = _automatic_labels(pipe, folder)
        _encode(pipe, videos, folder)
    svm_path = folder / "quality_svm"
    cli = _lightning("fit", cfg.run, folder, {"data.init_args.train_shards": videos,
                                              "data.init_args.feature_tag": tag, "data.init_args.labels": labels,
                                              "model.init_args.export_path": str(svm_path)})
    metrics = {f"held_out_{k}": round(v, 3) for k, v in cli.model.metrics.items() if k != "count"}
    return {"quality_svm": str(svm_path), "labels": labels, **metrics}


def stage_filter(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.filter import filter_videos

    threshold = pipe.config.quality.threshold
    report = filter_videos(pipe.output("generate", "videos"), Path(pipe.output("quality", "quality_svm")),
                           folder / "kept", threshold, progress=pipe.progress)
    totals = report.totals()
    if not totals.get("kept"):
        raise RuntimeError(f"the quality SVM kept none of {totals.get('videos', 0)} videos at threshold "
                           f"{threshold}; lower quality.threshold or train the video model longer")
    return {"kept_videos": str(folder / "kept"), "kept": totals["kept"], "dropped": totals["dropped"]}



def stage_elevation(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    export = folder / "elevation_mlp"
    cli = _lightning("fit", pipe.config.elevation, folder, {
        "data.init_args.train_shards": pipe.output("render", "orbit16"),
        "data.init_args.feature_tag": pipe.output("features", "feature_tag"),
        "data.init_args.val_shards": None,  # held-out objects: the datamodule's val_fraction of the renders
        "model.init_args.export_path": str(export)}, resume=True)
    metrics = {k.split("/")[-1]: round(float(v), 2) for k, v in cli.trainer.callback_metrics.items()
               if k.startswith("val/")}
    return {"elevation_mlp": str(export), **metrics}


def stage_label(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.label import label

    cfg = pipe.config.label
    report = label(pipe.output("filter", "kept_videos"), folder / "labelled",
                   elevation=Path(pipe.output("elevation", "elevation_mlp")), masks=cfg.masks,
                   mask_tolerance=cfg.mask_tolerance, radius=cfg.radius, progress=pipe.progress)
    return {"labelled_videos": str(folder / "labelled"), "labelled": report.totals().get("videos", 0)}



def stage_lrm_pretrain(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    cli = _lightning("fit", pipe.config.lrm_pretrain, folder, {
        "data.init_args.train_shards": _shards(pipe.output("label", "labelled_videos")),
        "data.init_args.val_shards": _shards(pipe.output("render", "held_out32"))}, resume=True)
    cli.model.export(folder / "pretrained")  # a save_pretrained folder: LRM.from_pretrained, infer, evaluate
    return {"pretrained": str(folder / "pretrained"), "checkpoint": _fitted_checkpoint(folder)}


def stage_lrm_finetune(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    cli = _lightning("fit", pipe.config.lrm_finetune, folder, {
        "model.init_args.pretrained": pipe.output("lrm_pretrain", "pretrained"),
        "data.init_args.train_shards": _shards(pipe.output("render", "set32")),
        "data.init_args.val_shards": _shards(pipe.output("render", "held_out32"))}, resume=True)
    cli.model.export(folder / "finetuned")
    return {"finetuned": str(folder / "finetuned"), "checkpoint": _fitted_checkpoint(folder)}


def stage_evaluate(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.commands.evaluate import evaluate

    cfg = pipe.config.evaluate
    evaluate([pipe.output("lrm_pretrain", "pretrained"), pipe.output("lrm_finetune", "finetuned")],
             _shards(pipe.output("captions", "held_out32")), folder, clip=model_source(pipe, cfg.clip, "clip"),
             assets=Path(pipe.output("assets", "held_out")), mesh_resolution=cfg.mesh_resolution,
             mesh_threshold=cfg.mesh_threshold, mesh_points=cfg.mesh_points,
             lpips_weights=cfg.lpips_weights,
             lpips_random_backbone=cfg.lpips_random_backbone, max_objects=cfg.max_objects,
             input_size=cfg.input_size, render_size=cfg.render_size, views_per_batch=cfg.views_per_batch,
             device=pipe.config.device, seed=pipe.config.seed)
    return {"summary": str(folder / "summary.md"), "plots": str(folder / "plots"),
            "report": str(folder / "report.html")}



def stage_export(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from PIL import Image

    from vfusion3d_lightning.geometry.mesh import density_grid, extract_mesh
    from vfusion3d_lightning.inference import ImageTo3D, save_outputs
    from vfusion3d_lightning.models.lrm import LRM

    cfg = pipe.config.export
    samples = _samples(pipe.output("render", "held_out32"), select=lambda n: [0])
    engine = ImageTo3D(LRM.from_pretrained(pipe.output("lrm_finetune", "finetuned")), pipe.config.device,
                       input_size=cfg.input_size, border_ratio=0.2, background="alpha")
    files, thresholds = [], []
    for sample in samples[:cfg.images]:
        image = folder / "inputs" / f"{sample.key}.png"
        atomic_write(image, lambda tmp, s=sample: Image.fromarray(s.images[0]).save(tmp, format="PNG"))
        result = engine.run(str(image), cfg.frames, cfg.render_size, frames_per_batch=8, mesh=False)
        threshold = cfg.mesh_threshold
        if threshold is None:
            threshold = float(density_grid(engine.model, result.planes, cfg.mesh_resolution).median())
        result.mesh = extract_mesh(engine.model, result.planes, cfg.mesh_resolution, threshold, "dense")
        thresholds.append(round(threshold, 4))
        files += [str(p) for p in save_outputs(result, folder / sample.key, cfg.video_format, cfg.mesh_format,
                                               fps=max(1, cfg.frames // 4))]
    return {"files": files, "samples": min(cfg.images, len(samples)), "mesh_thresholds": thresholds}


STAGES = (
    Stage("assets", stage_assets, (), lambda c: (c.seed, c.assets, ASSET_PREFIXES)),
    Stage("render", stage_render, ("assets",), lambda c: (c.seed, c.render, sorted(RENDER_JOBS))),
    Stage("captions", stage_captions, ("render",), lambda c: (c.seed, c.captions)),
    Stage("prompts", stage_prompts, (), lambda c: (c.seed, c.prompts)),
    Stage("images", stage_images, ("prompts", "captions"), lambda c: (c.seed, c.images)),
    Stage("video", stage_video, ("captions",), lambda c: c.video),
    Stage("generate", stage_generate, ("video", "images"), lambda c: (c.seed, c.generate)),
    Stage("features", stage_features, ("generate", "render"), lambda c: c.features),
    Stage("quality", stage_quality, ("features",), lambda c: c.quality),
    Stage("filter", stage_filter, ("quality", "generate"), lambda c: c.quality.threshold),
    Stage("elevation", stage_elevation, ("features",), lambda c: c.elevation),
    Stage("label", stage_label, ("filter", "elevation"), lambda c: c.label),
    Stage("lrm_pretrain", stage_lrm_pretrain, ("label", "render"), lambda c: c.lrm_pretrain),
    Stage("lrm_finetune", stage_lrm_finetune, ("lrm_pretrain",), lambda c: c.lrm_finetune),
    Stage("evaluate", stage_evaluate, ("lrm_finetune", "captions", "assets"), lambda c: c.evaluate),
    Stage("export", stage_export, ("lrm_finetune",), lambda c: c.export),
)


# ---------------------------------------------------------------- command


def pipeline(run_dir: str = "outputs/pipeline", seed: int = 0, device: str = "cpu",
             assets: AssetsConfig = AssetsConfig(), render: RenderConfig = RenderConfig(),
             captions: CaptionsConfig = CaptionsConfig(), prompts: PromptsConfig = PromptsConfig(),
             images: ImagesConfig = ImagesConfig(),
             video: LightningRun = LightningRun(), generate: GenerateConfig = GenerateConfig(),
             features: LightningRun = LightningRun(), quality: QualityConfig = QualityConfig(),
             elevation: LightningRun = LightningRun(), label: LabelConfig = LabelConfig(),
             lrm_pretrain: LightningRun = LightningRun(), lrm_finetune: LightningRun = LightningRun(),
             evaluate: EvaluateConfig = EvaluateConfig(), export: ExportConfig = ExportConfig(),
             progress: bool = True) -> dict[str, Any]:
    """Run every stage of the system, skipping those a matching `stage.json` shows done; writes summary.md and
    summary.json in `run_dir`. Give the settings as a YAML (`--config configs/pipeline/quickstart.yaml`) and
    override any key (`--assets.count 200 --run_dir outputs/pipeline/big`).

    Args:
        run_dir: the run folder; each stage writes into the folder named after it.
        seed: seeds assets, renders, generation and the automatic labels.
        device: where generation, evaluation and export run (`cpu`, `cuda`); training runs where its
            trainer config says.
        assets: the training and held-out 3D assets.
        render: orbit16, random32 and uniform32 renders.
        captions: Cap3D captions of the assets from their renders.
        prompts: web captions kept where an LLM answers "single object".
        images: a first frame per prompt by text-to-image.
        video: the video model's LightningCLI run (temporal layers).
        generate: orbit videos from condition images + prompts.
        features: the DINO features' LightningCLI predict run.
        quality: the quality SVM: labels, threshold, LightningCLI run.
        elevation: the elevation MLP's LightningCLI run.
        label: masks and orbit cameras of the kept videos.
        lrm_pretrain: the LRM's LightningCLI run on the labelled videos.
        lrm_finetune: the LRM's LightningCLI run on 3D renders with L2 added.
        evaluate: held-out metrics of both LRMs.
        export: turntables and meshes of sample held-out images.
        progress: show progress bars.
    """
    config = PipelineConfig(run_dir=run_dir, seed=seed, device=device, assets=assets, render=render,
                            captions=captions, prompts=prompts, images=images, video=video,
                            generate=generate, features=features, quality=quality, elevation=elevation, label=label,
                            lrm_pretrain=lrm_pretrain, lrm_finetune=lrm_finetune, evaluate=evaluate, export=export)
    for name, run in (("video", video), ("features", features), ("quality.run", quality.run),
                      ("elevation", elevation), ("lrm_pretrain", lrm_pretrain), ("lrm_finetune", lrm_finetune)):
        if run.config is None:
            raise ValueError(f"pipeline: {name}.config is not set; every LightningCLI stage needs a config file "
                             "(see configs/pipeline/quickstart.yaml)")
        run.config = str(Path(getattr(run.config, "absolute", run.config)).resolve())
    with folder_lock(config.run_dir, "pipeline"):
        return Pipeline(config, progress=progress).run()
