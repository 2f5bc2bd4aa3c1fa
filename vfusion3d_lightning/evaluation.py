"""3D evaluation of LRMs on held-out multi-view renders, as in the paper's ablations.

Protocol, per object of the shards (the 32-view `uniform32` sets; any N-view set with cameras works): view
`input_view` (default 0) composited on white is the input; its camera becomes the canonical source camera and
every view's pose is moved into that frame exactly as training does (`data.datamodules.LRMViews`); the LRM
renders all N views from those ground-truth cameras at `render_size` (default: the shards' resolution), and each
is compared with its ground truth on white by PSNR, SSIM (torchmetrics) and LPIPS (`losses.build_lpips`, so
training and evaluation share weights and errors). Object scores are means over its N views, the input view
included. PSNR of a view is capped at `PSNR_CAP` dB, so a perfect view (infinite PSNR) keeps means finite.

CLIP similarity (cosine of projected embeddings, in [-1, 1], not CLIPScore's x100): `clip_image` between the
input image and the rendered novel views (all views but the input one), `clip_text` between the sample's
`prompt` and the same views (NaN when the sample has no prompt).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vfusion3d_lightning.io import atomic_write, to_uint8_images
from vfusion3d_lightning.training.losses import lpips_loss

PSNR_CAP = 100.0  # dB; an MSE of 1e-10, far below 8-bit quantisation, so only exact copies reach it
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
METRICS = ("psnr", "ssim", "lpips", "clip_image", "clip_text")
CSV_FIELDS = ("object_id", *METRICS, "views")
LABELS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "clip_image": "CLIP image ↑",
          "clip_text": "CLIP text ↑"}


@dataclasses.dataclass
class ObjectScores:
    """One object's scores: means over its `views` rendered views (NaN where a metric was not computed)."""

    object_id: str
    psnr: float
    ssim: float
    lpips: float
    clip_image: float = math.nan
    clip_text: float = math.nan
    views: int = 0


# ---------------------------------------------------------------- image metrics


def psnr_per_view(rendered: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(V, 3, H, W) each, in [0, 1] -> (V,) PSNR in dB, capped at PSNR_CAP."""
    from torchmetrics.functional.image import peak_signal_noise_ratio  # imported late: keeps the CLI quick

    psnr = peak_signal_noise_ratio(rendered.float(), target.float(), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))
    return psnr.nan_to_num(posinf=PSNR_CAP).clamp(max=PSNR_CAP)


def ssim_per_view(rendered: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(V, 3, H, W) each, in [0, 1] -> (V,) SSIM (Gaussian 11x11 window, sigma 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(rendered.float(), target.float(), data_range=1.0, reduction="none")


def image_scores(rendered: torch.Tensor, target: torch.Tensor, lpips_model: nn.Module,
                 chunk: int = 8) -> dict[str, float]:
    """Mean PSNR, SSIM and LPIPS over views: rendered and target (V, 3, H, W) in [0, 1], on one device.
    Views go through LPIPS `chunk` at a time (VGG activations of 32 views at 512 px do not fit everywhere)."""
    if rendered.shape != target.shape or rendered.ndim != 4:
        raise ValueError(f"rendered {tuple(rendered.shape)} and target {tuple(target.shape)} must both be "
                         "(V, 3, H, W)")
    total = 0.0
    for start in range(0, len(target), chunk):
        part = slice(start, start + chunk)
        total += lpips_loss(lpips_model, rendered[part], target[part]).item() * len(target[part])
    return {"psnr": psnr_per_view(rendered, target).mean().item(),
            "ssim": ssim_per_view(rendered, target).mean().item(),
            "lpips": total / len(target)}


# ---------------------------------------------------------------- CLIP


class ClipSimilarity:
    """CLIP (transformers CLIPModel + CLIPProcessor) cosine similarities of images and captions."""

    def __init__(self, model: nn.Module, processor, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.processor = processor

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 4 returns the projected embeddings; 5 returns an output whose pooler_output holds them
        return F.normalize((out if isinstance(out, torch.Tensor) else out.pooler_output).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> unit embeddings (N, D); the processor resizes and normalises."""
        pixels = self.processor.image_processor(images=list(to_uint8_images(images)), return_tensors="pt")
        return self._features(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """N captions -> unit embeddings (N, D), truncated to the tokenizer's length (77 tokens for CLIP)."""
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return self._features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                           attention_mask=tokens["attention_mask"].to(self.device)))

    def similarities(self, reference: torch.Tensor, views: torch.Tensor,
                     text: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """reference image (3, H, W) and views (V, 3, H', W') -> cosine similarities (V,) of each view to the
        reference and, when `text` is given, (V,) to the caption (else None)."""
        embeddings = self.embed_images(views)  # sizes may differ from the reference's: embedded apart
        to_text = embeddings @ self.embed_texts([text])[0] if text else None
        return embeddings @ self.embed_images(reference[None])[0], to_text


def missing_clip_error(source: str, problem: str) -> FileNotFoundError:
    """The missing-weights error for CLIP: what to fetch, where to save it, and how to do without."""
    from huggingface_hub.constants import HF_HUB_CACHE

    from vfusion3d_lightning.hub import missing_weights_error

    target = f"checkpoints/{Path(DEFAULT_CLIP).name}"
    return missing_weights_error(
        f"CLIP model {source!r} ({problem})", f"{DEFAULT_CLIP} (`hf download {DEFAULT_CLIP} --local-dir {target}`)",
        target, note=f"then pass --clip {target}; or `hf download {DEFAULT_CLIP}` fills the Hugging Face cache "
                     f"({HF_HUB_CACHE}) and keeps the default; --clip none skips the CLIP metrics")


def load_clip(source: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu") -> ClipSimilarity:
    """CLIPModel + CLIPProcessor from a local folder, or a hub id already in the Hugging Face cache (nothing is
    downloaded). A missing model raises FileNotFoundError saying what to download and where."""
    from transformers import CLIPModel, CLIPProcessor

    source = str(source)
    if Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser())
    elif Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        raise missing_clip_error(source, "no such folder")
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:  # transformers says OSError for missing files, ValueError for bad ids
        where = "a folder without" if Path(source).is_dir() else "a hub id not in the local cache, so without"
        raise missing_clip_error(source, f"{where} the config, weights and processor files that CLIPModel and "
                                         f"CLIPProcessor.save_pretrained write: {type(err).__name__}: {err}") from err
    return ClipSimilarity(model, processor, device)


# ---------------------------------------------------------------- protocol


def evaluation_views(sample, input_view: int = 0, input_size: int = 512, render_size: int | None = None) -> dict:
    """One `MultiViewSample` -> the LRM's input and all N views' ground truth, through the training transform.

    Returns input_image (3, input_size, input_size) and source_camera (16,) for the input view; target_images
    (N, 3, S, S) on white and render_cameras (N, 25) in sample view order, in the frame where the input camera
    is canonical (S = render_size, default the sample's width); input_view, object_id, prompt.
    """
    from vfusion3d_lightning.data.datamodules import LRMViews
    from vfusion3d_lightning.data.schema import SampleError

    n = sample.num_views
    if not sample.has_cameras:
        raise SampleError(f"sample {sample.key!r} has no cameras; evaluation needs cam2world and intrinsics")
    if not -n <= input_view < n:
        raise ValueError(f"input view {input_view} is not one of sample {sample.key!r}'s {n} views")
    input_view %= n
    order = [input_view] + [i for i in range(n) if i != input_view]  # LRMViews takes view 0 as the input
    moved = dataclasses.replace(sample, images=sample.images[order], cam2world=sample.cam2world[order],
                                intrinsics=sample.intrinsics[order], elevations=None, azimuths=None)
    size = render_size or sample.images.shape[2]
    batch = LRMViews(n, True, input_size, size)(moved, np.random.default_rng(0))
    back = torch.from_numpy(np.argsort(order))  # undo the reordering: output view i is sample view i
    return {"input_image": batch["input_image"], "source_camera": batch["source_camera"],
            "target_images": batch["target_images"][back], "render_cameras": batch["render_cameras"][back],
            "input_view": input_view, "object_id": sample.object_id, "prompt": sample.prompt}


class Evaluator:
    """Scores one LRM on multi-view samples: `evaluate(samples)` -> a list of `ObjectScores`.

    `dtype` bfloat16 runs the LRM under autocast (planes and metrics stay float32), an `LRM`'s network weights
    held in bfloat16 (`LRM.cast_network_weights`); `views_per_batch` views are rendered per call, each call in
    passes of at most `max_rays` rays (None: sized to free GPU memory as `inference.max_rays_for` does, 2**16
    on the CPU). The renderer's stratified jitter is seeded per object.
    """

    def __init__(self, model: nn.Module, lpips_model: nn.Module, clip: ClipSimilarity | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, input_view: int = 0,
                 input_size: int = 512, render_size: int | None = None, views_per_batch: int = 8,
                 max_rays: int | None = None, seed: int = 0):
        from vfusion3d_lightning.inference import max_rays_for
        from vfusion3d_lightning.models.lrm import LRM

        if views_per_batch < 1:
            raise ValueError(f"views_per_batch must be >= 1, got {views_per_batch}")
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.eval().to(self.device)
        if dtype != torch.float32 and isinstance(self.model, LRM):  # cast once what autocast casts every call
            self.model.cast_network_weights(dtype)
        self.lpips = lpips_model.to(self.device)
        self.clip = clip
        self.input_view, self.input_size, self.render_size = input_view, input_size, render_size
        self.views_per_batch, self.seed = views_per_batch, seed
        self.max_rays = max_rays or max_rays_for(self.model, self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def render(self, views: dict) -> torch.Tensor:
        """`evaluation_views` output -> the N views rendered from its cameras: (N, 3, S, S) float32 in [0, 1]."""
        cameras = views["render_cameras"][None].to(self.device)
        size = views["target_images"].shape[-1]
        generator = torch.Generator(self.device).manual_seed(self.seed)
        with self._autocast():
            planes = self.model(views["input_image"][None].to(self.device),
                                views["source_camera"][None].to(self.device))
        planes = planes.float()
        frames = []
        for start in range(0, cameras.shape[1], self.views_per_batch):
            with self._autocast():
                out = self.model.render(planes, cameras[:, start:start + self.views_per_batch], size,
                                        generator=generator, max_rays=self.max_rays)
            frames.append(out.rgb[0].float().clamp(0, 1))
        return torch.cat(frames)

    def score(self, views: dict, rendered: torch.Tensor) -> ObjectScores:
        """Compare renders (N, 3, S, S) with the ground truth in `views` (evaluation_views output)."""
        target = views["target_images"].to(rendered.device)
        scores = ObjectScores(views["object_id"], **image_scores(rendered, target, self.lpips, self.views_per_batch),
                              views=len(target))
        if self.clip is not None:
            novel = [i for i in range(len(rendered)) if i != views["input_view"]] or [0]
            to_image, to_text = self.clip.similarities(views["input_image"], rendered[novel], views["prompt"])
            scores.clip_image = to_image.mean().item()
            scores.clip_text = math.nan if to_text is None else to_text.mean().item()
        return scores

    def evaluate_sample(self, sample) -> ObjectScores:
        """One `MultiViewSample` (all its views, with cameras) -> its scores."""
        views = evaluation_views(sample, self.input_view, self.input_size, self.render_size)
        return self.score(views, self.render(views))

    def evaluate(self, samples: Iterable, max_objects: int | None = None, total: int | None = None,
                 desc: str = "evaluate") -> list[ObjectScores]:
        """Score the first `max_objects` samples (all when None), with a tqdm bar."""
        from itertools import islice

        from tqdm import tqdm

        if max_objects is not None:
            total = max_objects if total is None else min(total, max_objects)
        chosen = tqdm(islice(samples, max_objects), total=total, desc=desc, unit="object")
        return [self.evaluate_sample(sample) for sample in chosen]


def held_out_samples(pattern: str) -> Iterator:
    """Validated `MultiViewSample`s with cameras from shards (folder, brace pattern, glob or list, as
    `expand_shards`: `pipe:` URLs are refused unless VFUSION3D_ALLOW_PIPE=1), in shard order."""
    from vfusion3d_lightning.data.datamodules import expand_shards
    from vfusion3d_lightning.data.schema import SampleError, ShardError
    from vfusion3d_lightning.data.schema import read_samples as read_shard_samples

    try:
        yield from read_shard_samples(expand_shards(pattern), require_cameras=True)
    except ShardError:
        raise
    except SampleError as err:  # training skips bad samples; a comparison of checkpoints must not
        raise SampleError(f"{err}; evaluation scores every object of the shards: mend that sample or leave its "
                          "shard out of --shards") from err


# ---------------------------------------------------------------- outputs


def write_csv(path: str | Path, scores: list[ObjectScores]) -> Path:
    """One row per object: object_id, psnr, ssim, lpips, clip_image, clip_text, views."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for item in scores:
                row = dataclasses.asdict(item)
                writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})

    return atomic_write(path, write)


def mean_std(values: list[float]) -> str:
    """'mean ± std' (sample std) of the finite values, 'n/a' when there are none."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if not len(array):
        return "n/a"
    std = array.std(ddof=1) if len(array) > 1 else 0.0
    digits = 2 if abs(array.mean()) >= 10 else 4
    return f"{array.mean():.{digits}f} ± {std:.{digits}f}"


def summary_table(results: dict[str, list[ObjectScores]]) -> str:
    """Markdown: one row per checkpoint, mean ± std over objects per metric."""
    header = ["checkpoint", "objects", "views", *(LABELS[m] for m in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, scores in results.items():
        counts = sorted({s.views for s in scores})
        views = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        cells = [name, str(len(scores)), views, *(mean_std([getattr(s, m) for s in scores]) for m in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_distributions(results: dict[str, list[ObjectScores]], directory: str | Path) -> list[Path]:
    """`<metric>.png` per metric with any finite value: one box (and its points) per checkpoint."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for metric in METRICS:
        data = {name: [v for s in scores if math.isfinite(v := getattr(s, metric))] for name, scores in results.items()}
        if not any(data.values()):
            continue
        names = [name for name in data if data[name]]
        figure = Figure(figsize=(1.6 + 1.4 * len(names), 3.6), layout="constrained")
        FigureCanvasAgg(figure)  # Agg, without pyplot's global state
        axes = figure.add_subplot()
        axes.boxplot([data[n] for n in names], tick_labels=names, showmeans=True)
        for i, name in enumerate(names, start=1):
            jitter = np.random.default_rng(i).uniform(-0.08, 0.08, len(data[name]))
            axes.scatter(i + jitter, data[name], s=8, alpha=0.5)
        axes.set_ylabel(LABELS[metric])
        axes.set_title(f"{LABELS[metric]} per object")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        written.append(atomic_write(Path(directory) / f"{metric}.png", lambda tmp: tmp.write_bytes(buffer.getvalue())))
    return written


def checkpoint_names(sources: list[str]) -> list[str]:
    """Short unique folder-safe names: the file stem or folder name, numbered where two clash."""
    names: list[str] = []
    for source in sources:
        path = Path(source)
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem if path.suffix in (".ckpt", ".safetensors", ".pt", ".pth")
                      else path.name) or "checkpoint"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names
