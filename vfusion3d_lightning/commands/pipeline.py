"""The whole VFusion3D system as one resumable command: `vfusion3d-lightning pipeline --config CONFIG.yaml`.

Stages, in the order of ARCHITECTURE.md's data flow, each in its own folder of the run folder:

    assets         procedural 3D assets (or the user's folders), training and held-out
    render         orbit16 renders (video model, elevation MLP), random32 sets (LRM fine-tune), uniform32 held out
    video          fine-tune the video model's temporal layers on the orbits (LightningCLI fit)
    generate       orbit videos from condition images + prompts
    features       DINO features of the generated videos and the orbit renders (LightningCLI predict)
    quality        the quality SVM: from a labels file, or from automatic labels (renders vs spoiled renders)
    filter         keep the videos the SVM scores as good
    elevation      the elevation MLP on the orbit renders (LightningCLI fit)
    label          elevation + orbit cameras and masks into the kept videos
    lrm_pretrain   the LRM on the labelled synthetic videos, multi-stage (LightningCLI fit)
    lrm_finetune   the LRM on 3D renders with L2 added, from the pre-trained weights (LightningCLI fit)
    evaluate       PSNR/SSIM/LPIPS (and CLIP) of both LRMs on the held-out objects
    export         turntable GIFs and meshes for sample held-out images

A stage that finishes writes `stage.json` (its config, the digests of its inputs, the digest of its outputs);
a rerun skips a stage whose record matches, and redoes it (and so everything after it) otherwise, its old
folder moved to `<folder>.previous`. A killed stage has no record, so the rerun starts there; rendering, generation, feature caching, filter and label skip
the shards they finished, and training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from vfusion3d_lightning.io import atomic_write

RECORD = "stage.json"


# ---------------------------------------------------------------- configuration


@dataclass
class LightningRun:
    """A LightningCLI run: a config file and dotted overrides (`model.init_args.lr: 1.0e-4`). The pipeline sets
    the data paths, `trainer.default_root_dir` and what links stages (checkpoints, feature tags)."""

    config: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class AssetsConfig:
    folder: str | None = None  # the user's 3D assets (.glb/.gltf/.obj/.ply); None: procedural
    held_out_folder: str | None = None  # the user's held-out assets (evaluation and samples)
    count: int = 100  # procedural training assets
    held_out: int = 8  # procedural held-out assets
    style: str = "upright"  # procedural style: upright assets show their elevation (see data/procedural.py)


@dataclass
class RenderConfig:
    resolution: int = 64
    workers: int = 2
    shard_size: int = 16


@dataclass
class GenerateConfig:
    inputs: str | None = None  # a folder of images (+ .txt prompts) or .jsonl/.csv; None: first views of renders
    count: int = 48  # videos, when the inputs are the renders' first views
    prompt: str = "a 3D object"  # their prompt
    frames: int = 16
    size: int = 32
    steps: int = 4
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0])
    batch_size: int = 8
    shard_size: int = 16


@dataclass
class QualityConfig:
    labels: str | None = None  # a labels file (label-ui) over the generated videos; None: automatic labels
    threshold: float = 0.5
    run: LightningRun = field(default_factory=LightningRun)


@dataclass
class LabelConfig:
    masks: str = "threshold"
    mask_tolerance: int = 12
    radius: float = 1.5


@dataclass
class EvaluateConfig:
    max_objects: int | None = None
    clip: str = "none"
    lpips_weights: str | None = None
    lpips_random_backbone: bool = False
    render_size: int | None = None
    input_size: int = 512
    views_per_batch: int = 8


@dataclass
class ExportConfig:
    images: int = 2
    frames: int = 24
    render_size: int = 64
    input_size: int = 512
    mesh_resolution: int = 64
    # the released density level; None: the median density of the grid, for a briefly trained model whose
    # density has not reached the released scale (its mesh is then a rough blob, but the path is exercised)
    mesh_threshold: float | None = 1.0
    video_format: str = "gif"
    mesh_format: str = "glb"


@dataclass
class PipelineConfig:
    run_dir: str = "outputs/pipeline"
    seed: int = 0
    device: str = "cpu"
    assets: AssetsConfig = field(default_factory=AssetsConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
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


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """A pipeline YAML (unknown keys and wrong types are errors) with `key=value` overrides on top."""
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config {path} does not exist (see configs/pipeline/)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.load(path),
                                 OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ValueError(f"{path}: {err}") from None
    config: PipelineConfig = OmegaConf.to_object(merged)
    base = path.resolve().parent  # LightningCLI config paths are relative to the pipeline config
    for run in (config.video, config.features, config.quality.run, config.elevation, config.lrm_pretrain,
                config.lrm_finetune):
        if not run.config:
            raise ValueError(f"{path}: every LightningCLI stage needs `config:` (a file in configs/)")
        run.config = str((base / run.config).resolve()) if not Path(run.config).is_absolute() else run.config
    return config


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
        index = [s.name for s in STAGES].index(stage)
        return self.run_dir / f"{index + 1:02d}-{stage}"

    def output(self, stage: str, name: str) -> Any:
        return self.records[stage]["outputs"][name]

    def run(self) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
        lines += ["", "## Held-out metrics", "", metrics_table.strip(), "", "## Outputs", ""]
        for name in ("video_checkpoint", "quality_svm", "elevation_mlp", "pretrained", "finetuned"):
            for stage_outputs in outputs.values():
                if name in stage_outputs:
                    lines.append(f"- {name}: {stage_outputs[name]}")
        lines += [f"- sample: {path}" for path in self.output("export", "files")]
        text = "\n".join(lines) + "\n"
        atomic_write(self.run_dir / "summary.md", lambda tmp: tmp.write_text(text))
        atomic_write(self.run_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        print(text)
        return summary


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
    from vfusion3d_lightning.cli import lightning_cli

    args = ["--config", run.config, *_override_args(run.overrides), *_override_args(settings),
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


def stage_assets(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.data.procedural import write_assets
    from vfusion3d_lightning.data.render_shards import find_assets

    cfg = pipe.config.assets
    if cfg.folder:
        if not cfg.held_out_folder:
            raise ValueError("assets.folder needs assets.held_out_folder too (held-out objects for evaluation)")
        train, held_out = Path(cfg.folder), Path(cfg.held_out_folder)
    else:
        train, held_out = folder / "train", folder / "held_out"
        seed = pipe.config.seed
        write_assets(train, cfg.count, seed=seed * 1_000_003, progress=pipe.progress, style=cfg.style)
        write_assets(held_out, cfg.held_out, seed=seed * 1_000_003 + 500_000, progress=pipe.progress,
                     style=cfg.style)
    counts = {"train_assets": len(find_assets(train)), "held_out_assets": len(find_assets(held_out))}
    if not counts["train_assets"] or not counts["held_out_assets"]:
        raise ValueError(f"no assets in {train} or {held_out}")
    return {"train": str(train), "held_out": str(held_out), **counts}


def stage_render(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder

    cfg, seed = pipe.config.render, pipe.config.seed
    jobs = {"orbit16": ("train", "orbit16"), "set32": ("train", "random32"), "held_out32": ("held_out", "uniform32")}
    outputs: dict[str, Any] = {}
    for name, (assets, views) in jobs.items():
        settings = RenderSettings(views=views, resolution=cfg.resolution, seed=seed)
        report = render_folder(pipe.output("assets", assets), folder / name, settings, workers=cfg.workers,
                               shard_size=cfg.shard_size, progress=pipe.progress)
        if report.failed:
            print(f"  {name}: {len(report.failed)} assets failed to render (see {folder / name}/render_report.json)")
        outputs[name] = str(folder / name)
        outputs[f"{name}_objects"] = report.rendered + report.skipped_existing
    return outputs


def _samples(folder: str, select=None) -> list:
    """The samples of a stage's shard folder, in order; `select` picks views as decode_sample's does."""
    from vfusion3d_lightning.data.schema import complete_shards, read_samples

    return list(read_samples(complete_shards(folder), select))


def _shards(folder: str) -> str:
    return str(Path(folder) / "shard-*.tar")


def stage_video(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    orbits = _shards(pipe.output("render", "orbit16"))
    _lightning("fit", pipe.config.video, folder, {"data.init_args.train_shards": orbits,
                                                   "data.init_args.val_shards": orbits}, resume=True)
    return {"video_checkpoint": _fitted_checkpoint(folder)}


def _condition_images(pipe: Pipeline, folder: Path) -> Path:
    """First views of the training orbits on white, with the prompt beside each (the quickstart's inputs)."""
    from PIL import Image

    from vfusion3d_lightning.io import on_white, to_uint8_images

    cfg = pipe.config.generate
    inputs = folder / "inputs"
    inputs.mkdir(exist_ok=True)
    renders = _samples(pipe.output("render", "orbit16"), select=lambda n: [0])
    for i in range(cfg.count):  # more videos than renders: another seed per round
        sample = renders[i % len(renders)]
        stem = f"{sample.key}_{i // len(renders)}"
        picture = to_uint8_images(on_white(sample.images)[0])
        atomic_write(inputs / f"{stem}.png", lambda tmp, p=picture: Image.fromarray(p).save(tmp, format="PNG"))
        atomic_write(inputs / f"{stem}.txt", lambda tmp: tmp.write_text(cfg.prompt))
    return inputs


def stage_generate(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    import torch

    from vfusion3d_lightning.data.generate_shards import generate_shards, read_inputs
    from vfusion3d_lightning.models.video import SamplerSettings
    from vfusion3d_lightning.training.video_diffusion import load_video_model

    cfg = pipe.config.generate
    source = cfg.inputs or _condition_images(pipe, folder)
    checkpoint = pipe.output("video", "video_checkpoint")
    model = load_video_model(checkpoint).to(pipe.config.device).eval()
    settings = SamplerSettings(num_frames=cfg.frames, num_inference_steps=cfg.steps, min_guidance=cfg.guidance[0],
                               max_guidance=cfg.guidance[-1])
    with torch.no_grad():
        report = generate_shards(model, read_inputs(source), folder / "videos", settings, frame_size=cfg.size,
                                 batch_size=cfg.batch_size, seed=pipe.config.seed, shard_size=cfg.shard_size,
                                 border_ratio=None, background="white", model_name=checkpoint,
                                 progress=pipe.progress)
    return {"videos": str(folder / "videos"), "generated": report.generated + report.skipped_existing,
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
    svm_path = folder / "quality_svm.skops"
    cli = _lightning("fit", cfg.run, folder, {"data.init_args.train_shards": videos,
                                              "data.init_args.feature_tag": tag, "data.init_args.labels": labels,
                                              "model.init_args.export_path": str(svm_path)})
    metrics = {f"held_out_{k}": round(v, 3) for k, v in cli.model.metrics.items() if k != "count"}
    return {"quality_svm": str(svm_path), "labels": labels, **metrics}


def stage_filter(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from vfusion3d_lightning.data.curate_shards import file_digest, filter_shards
    from vfusion3d_lightning.models.curation.quality import QualitySVM

    svm_path = pipe.output("quality", "quality_svm")
    report = filter_shards(pipe.output("generate", "videos"), folder / "kept", QualitySVM.load(svm_path),
                           pipe.config.quality.threshold, svm_id=file_digest(svm_path), progress=pipe.progress)
    totals = report.totals()
    if not totals.get("kept"):
        raise RuntimeError(f"the quality SVM kept none of {totals.get('videos', 0)} videos at threshold "
                           f"{pipe.config.quality.threshold}; lower quality.threshold or train the video model longer")
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
    from vfusion3d_lightning.data.curate_shards import Labellers, file_digest, label_shards
    from vfusion3d_lightning.models.curation.elevation import ElevationMLP

    cfg, mlp = pipe.config.label, pipe.output("elevation", "elevation_mlp")
    labellers = Labellers(elevation=ElevationMLP.from_pretrained(mlp), masks=cfg.masks,
                          mask_tolerance=cfg.mask_tolerance, radius=cfg.radius)
    report = label_shards(pipe.output("filter", "kept_videos"), folder / "labelled", labellers,
                          {"elevation": file_digest(mlp)}, progress=pipe.progress)
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
    from vfusion3d_lightning import evaluation as metrics

    cfg = pipe.config.evaluate
    parser = argparse.ArgumentParser()
    metrics.add_arguments(parser)
    words = ["--checkpoint", pipe.output("lrm_pretrain", "pretrained"), "--checkpoint",
             pipe.output("lrm_finetune", "finetuned"), "--shards", _shards(pipe.output("render", "held_out32")),
             "--out", str(folder), "--clip", cfg.clip, "--input-size", str(cfg.input_size),
             "--views-per-batch", str(cfg.views_per_batch), "--device", pipe.config.device,
             "--seed", str(pipe.config.seed)]
    words += ["--lpips-weights", cfg.lpips_weights] if cfg.lpips_weights else []
    words += ["--lpips-random-backbone"] if cfg.lpips_random_backbone else []
    words += ["--max-objects", str(cfg.max_objects)] if cfg.max_objects else []
    words += ["--render-size", str(cfg.render_size)] if cfg.render_size else []
    metrics.run(parser.parse_args(words))
    return {"summary": str(folder / "summary.md"), "plots": str(folder / "plots")}


def stage_export(pipe: Pipeline, folder: Path) -> dict[str, Any]:
    from PIL import Image

    from vfusion3d_lightning.inference import ImageTo3D, save_outputs
    from vfusion3d_lightning.geometry.mesh import density_grid, extract_mesh
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
    Stage("assets", stage_assets, (), lambda c: (c.seed, c.assets)),
    Stage("render", stage_render, ("assets",), lambda c: (c.seed, c.render)),
    Stage("video", stage_video, ("render",), lambda c: c.video),
    Stage("generate", stage_generate, ("video",), lambda c: (c.seed, c.generate)),
    Stage("features", stage_features, ("generate", "render"), lambda c: c.features),
    Stage("quality", stage_quality, ("features",), lambda c: c.quality),
    Stage("filter", stage_filter, ("quality", "generate"), lambda c: c.quality.threshold),
    Stage("elevation", stage_elevation, ("features",), lambda c: c.elevation),
    Stage("label", stage_label, ("filter", "elevation"), lambda c: c.label),
    Stage("lrm_pretrain", stage_lrm_pretrain, ("label", "render"), lambda c: c.lrm_pretrain),
    Stage("lrm_finetune", stage_lrm_finetune, ("lrm_pretrain",), lambda c: c.lrm_finetune),
    Stage("evaluate", stage_evaluate, ("lrm_finetune",), lambda c: c.evaluate),
    Stage("export", stage_export, ("lrm_finetune",), lambda c: c.export),
)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/pipeline/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run_dir=outputs/run2 --set assets.count=200")


def run(args: argparse.Namespace) -> int:
    Pipeline(load_config(args.config, args.set)).run()
    return 0
