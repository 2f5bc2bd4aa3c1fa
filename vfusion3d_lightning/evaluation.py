"""3D evaluation of LRMs on held-out multi-view renders: novel views and geometry, per object.

Protocol, per object of the shards (the 32-view `uniform32` sets; any N-view set with cameras works):

1. Input view: one view, chosen per object from (seed, object_id) (`seeded_input_view`: reproducible, and
   different objects get different views) or the same fixed view for all; composited on white, it is the
   LRM's input. Its camera becomes the canonical source camera and every view's pose is moved into that
   frame exactly as training does (`data.datamodules.LRMViews`).
2. Novel views: the LRM renders the other N - 1 views from their ground-truth cameras at `render_size`
   (default: the shards' resolution); each is compared with its ground truth on white by PSNR, SSIM
   (torchmetrics) and LPIPS (`losses.build_lpips`, so training and evaluation share weights and errors).
   The input view is not scored. Object scores are means over its N - 1 novel views. PSNR of a view is capped
   at `PSNR_CAP` dB, so a perfect view (infinite PSNR) keeps means finite. Opacity IoU: the rendered opacity
   thresholded at 0.5 against the ground-truth alpha thresholded at 0.5, over all pixels of the novel views.
   Beside each object's scores, the same scores of the trivial prediction (`constant_background`): the white
   background everywhere, so an empty opacity (IoU 0 against any non-empty mask). CLIP similarity (cosine of
   projected embeddings, in [-1, 1], not CLIPScore's x100): `clip_image` between the input image and the
   rendered novel views, `clip_text` between the sample's `prompt` and the same views (NaN without a prompt).
3. Geometry (with the held-out assets): the mesh of the LRM's density at `mesh_threshold` (`extract_mesh`,
   coarse to fine, `mesh_resolution`^3) is turned from the input camera's canonical frame back into the
   world frame of the renders, and compared with the asset's mesh, loaded by the renderer's own loader
   (`data.render.load_asset`, so both are in the frame the views were rendered in), by `mesh_metrics`:
   Chamfer distance and F-score at 0.1, 0.2 and 0.5 after unit-cube normalisation, rotation search and ICP.
   No surface at the threshold: NaN, counted, and a warning suggesting a level that has one.
   `mesh_seconds` times image -> planes -> mesh.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
import sys
import time
import zlib
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
FSCORE_THRESHOLDS = (0.1, 0.2, 0.5)  # in the unit cube's side, as `geometry.metrics` reports them
IMAGE_METRICS = ("psnr", "ssim", "lpips", "opacity_iou", "clip_image", "clip_text")
GEOMETRY_METRICS = ("chamfer", *(f"fscore@{t:g}" for t in FSCORE_THRESHOLDS))
METRICS = (*IMAGE_METRICS, *GEOMETRY_METRICS)
BASELINE_METRICS = ("psnr", "ssim", "lpips", "opacity_iou")  # scored for the constant background prediction too
BASELINE = "constant background"  # its row in the summary tables
CSV_FIELDS = ("object_id", "input_view", *METRICS, *(f"baseline_{m}" for m in BASELINE_METRICS), "mesh_seconds",
              "no_surface", "views")
LABELS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "opacity_iou": "opacity IoU ↑",
          "clip_image": "CLIP image ↑",
          "clip_text": "CLIP text ↑", "chamfer": "Chamfer ↓",
          **{f"fscore@{t:g}": f"F-score@{t:g} ↑" for t in FSCORE_THRESHOLDS}}


@dataclasses.dataclass
class ObjectScores:
    """One object's scores: image metrics are means over its `views` scored (novel) views; geometry metrics
    compare its extracted mesh with the asset's (`fscore` keyed by threshold); `baseline` the image metrics of
    the constant background prediction on the same views (BASELINE_METRICS). NaN (or an empty `fscore`) where a
    metric was not computed; `no_surface`: the LRM's field had no surface at the mesh threshold."""

    object_id: str
    psnr: float
    ssim: float
    lpips: float
    opacity_iou: float = math.nan
    clip_image: float = math.nan
    clip_text: float = math.nan
    chamfer: float = math.nan
    fscore: dict[float, float] = dataclasses.field(default_factory=dict)
    mesh_seconds: float = math.nan
    no_surface: bool = False
    input_view: int = 0
    views: int = 0
    baseline: dict[str, float] = dataclasses.field(default_factory=dict)

    def value(self, metric: str) -> float:
        """The score named as in METRICS (`fscore@0.1` reads `fscore[0.1]`, `baseline_psnr` `baseline["psnr"]`)."""
        if metric.startswith("fscore@"):
            return self.fscore.get(float(metric.removeprefix("fscore@")), math.nan)
        if metric.startswith("baseline_"):
            return self.baseline.get(metric.removeprefix("baseline_"), math.nan)
        return getattr(self, metric)

    def baseline_scores(self) -> ObjectScores:
        """The constant background prediction's scores on this object's views, as an ObjectScores (the rest NaN)."""
        return ObjectScores(self.object_id, **{m: self.baseline.get(m, math.nan) for m in BASELINE_METRICS},
                            input_view=self.input_view, views=self.views)

    def row(self) -> dict[str, str | int]:
        """The objects.csv row: CSV_FIELDS, floats to 6 significant digits."""
        values = {name: getattr(self, name) if name in ("object_id", "input_view", "mesh_seconds", "no_surface",
                                                         "views") else self.value(name) for name in CSV_FIELDS}
        return {k: f"{v:.6g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else v
                for k, v in values.items()}


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


def opacity_iou(opacity: torch.Tensor, alpha: torch.Tensor, level: float = 0.5) -> float:
    """IoU of two masks over all pixels of all views: the rendered opacity and the ground-truth alpha (same
    shape, in [0, 1]), each thresholded at `level`. Both empty: 1 (they agree everywhere)."""
    if opacity.shape != alpha.shape:
        raise ValueError(f"opacity {tuple(opacity.shape)} and alpha {tuple(alpha.shape)} must have the same shape")
    ours, truth = opacity > level, alpha > level
    union = (ours | truth).sum().item()
    return (ours & truth).sum().item() / union if union else 1.0


def constant_background_scores(target: torch.Tensor, alpha: torch.Tensor, lpips_model: nn.Module,
                               chunk: int = 8) -> dict[str, float]:
    """BASELINE_METRICS of the trivial prediction, the white background everywhere (an empty opacity), against
    target (V, 3, H, W) on white and its alpha (V, 1, H, W)."""
    white = torch.ones_like(target)
    return {**image_scores(white, target, lpips_model, chunk), "opacity_iou": opacity_iou(torch.zeros_like(alpha),
                                                                                           alpha)}


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


def seeded_input_view(seed: int, object_id: str, num_views: int) -> int:
    """The input view of an object: drawn from (seed, object_id), so a rerun, a resumed run or another
    checkpoint gives the object the same view while objects differ (crc32: stable across processes)."""
    return int(np.random.default_rng([seed, zlib.crc32(object_id.encode())]).integers(num_views))


def evaluation_views(sample, input_view: int = 0, input_size: int = 512, render_size: int | None = None) -> dict:
    """One `MultiViewSample` -> the LRM's input and all N views' ground truth, through the training transform.

    Returns input_image (3, input_size, input_size) and source_camera (16,) for the input view; target_images
    (N, 3, S, S) on white, target_masks (N, 1, S, S) their alpha and render_cameras (N, 25) in sample view
    order, in the frame where the input camera is canonical (S = render_size, default the sample's width);
    scored_views (N - 1,) the indices of the novel
    views (all but the input one); world_rotation (3, 3) that frame's rotation from the world (p_canonical =
    R p_world); input_view, object_id, prompt, asset (the source asset's path that `render` recorded, or None).
    """
    from vfusion3d_lightning.cameras import canonical_source_pose
    from vfusion3d_lightning.data.datamodules import LRMViews
    from vfusion3d_lightning.data.schema import SampleError

    n = sample.num_views
    if not sample.has_cameras:
        raise SampleError(f"sample {sample.key!r} has no cameras; evaluation needs cam2world and intrinsics")
    if n < 2:
        raise SampleError(f"sample {sample.key!r} has {n} view; evaluation scores views other than the input one")
    if not -n <= input_view < n:
        raise ValueError(f"input view {input_view} is not one of sample {sample.key!r}'s {n} views")
    input_view %= n
    order = [input_view] + [i for i in range(n) if i != input_view]  # LRMViews takes view 0 as the input
    moved = dataclasses.replace(sample, images=sample.images[order], cam2world=sample.cam2world[order],
                                intrinsics=sample.intrinsics[order], elevations=None, azimuths=None)
    size = render_size or sample.images.shape[2]
    batch = LRMViews(n, True, input_size, size)(moved, np.random.default_rng(0))
    back = torch.from_numpy(np.argsort(order))  # undo the reordering: output view i is sample view i
    # as `cameras.canonicalize_poses` turns the world
    world_rotation = canonical_source_pose()[:3, :3].double() @ torch.from_numpy(
        np.asarray(sample.cam2world[input_view], np.float64))[:3, :3].T
    return {"input_image": batch["input_image"], "source_camera": batch["source_camera"],
            "target_images": batch["target_images"][back], "target_masks": batch["target_masks"][back],
            "render_cameras": batch["render_cameras"][back],
            "scored_views": torch.tensor(order[1:]).sort().values, "world_rotation": world_rotation,
            "input_view": input_view, "object_id": sample.object_id, "prompt": sample.prompt,
            "asset": sample.extra.get("asset")}


def turntable_cameras(views: dict, frames: int = 24) -> torch.Tensor:
    """Render cameras (frames, 25) in the frame of `evaluation_views` output `views`: an orbit about the world's up
    axis through the input camera (its distance, elevation and intrinsics; frame 0 is the input view), made in
    the world and moved into that frame (p_canonical = R p_world) as the ground-truth cameras were."""
    from vfusion3d_lightning.cameras import orbit_poses

    rotation = views["world_rotation"].float()
    source = views["render_cameras"][views["input_view"]]
    distance = source[:16].view(4, 4)[:3, 3].norm().item()
    x, y, z = rotation[0].tolist()  # the input camera's direction in the world: R^T (1, 0, 0)
    elevation = max(-1.4, min(1.4, math.asin(max(-1.0, min(1.0, z)))))  # orbit_poses needs |elevation| < pi/2
    poses = orbit_poses(frames, elevation, distance, math.atan2(y, x))
    to_views = torch.eye(4)
    to_views[:3, :3] = rotation
    return torch.cat([(to_views @ poses).flatten(1), source[16:].expand(frames, 9)], dim=1)


class GroundTruthMeshes:
    """The held-out assets that `render` rendered, found per sample: by the relative path the sample records
    (`extra["asset"]`), else by object id (the sample key `render` makes of the file name). Loaded with the
    renderer's loader (`data.render.load_asset`), so the mesh is in the frame of the renders."""

    def __init__(self, folder: str | Path):
        from vfusion3d_lightning.data.render_shards import find_assets, sample_key

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"assets folder {self.folder} does not exist; give --assets the held-out "
                                    "assets folder that `render` rendered the shards from")
        self.by_key = {sample_key(path): path for path in find_assets(self.folder)}
        if not self.by_key:
            raise FileNotFoundError(f"no assets (.glb/.gltf/.obj/.ply) in {self.folder}; give --assets the "
                                    "held-out assets folder that `render` rendered the shards from")

    def path(self, object_id: str, asset: str | None = None) -> Path:
        """The asset file of an object; FileNotFoundError naming the object and the folder if none."""
        candidate = (self.folder / asset).resolve() if asset else None
        # a shard's recorded path is only a hint, and never leads outside the folder
        if candidate and candidate.is_relative_to(self.folder.resolve()) and candidate.is_file():
            return self.folder / asset
        if object_id in self.by_key:
            return self.by_key[object_id]
        raise FileNotFoundError(f"no asset for object {object_id!r} in {self.folder} (looked for "
                                f"{asset or object_id + '.*'}); --assets must be the folder the held-out shards "
                                "were rendered from")

    def load(self, object_id: str, asset: str | None = None):
        """The object's mesh (trimesh.Trimesh), as the renderer loads it."""
        from vfusion3d_lightning.data.render import load_asset

        return load_asset(self.path(object_id, asset))


class Evaluator:
    """Scores one LRM on multi-view samples: `evaluate(samples)` -> a list of `ObjectScores`.

    `input_view` None draws each object's input view from (seed, object_id) (`seeded_input_view`); a number
    fixes it. `dtype` bfloat16 runs the LRM under autocast (planes and metrics stay float32), an `LRM`'s
    network weights held in bfloat16 (`LRM.cast_network_weights`); `views_per_batch` views are rendered per
    call, each call in passes of at most `max_rays` rays (None: sized to free GPU memory as
    `inference.max_rays_for` does, 2**16 on the CPU). The renderer's stratified jitter is seeded per object.
    With `ground_truth` each object's mesh (`mesh_resolution`^3 grid, density level `mesh_threshold`) is
    compared with its asset's; `log` gets the warnings (default: stderr, above the progress bar).
    `on_object(evaluator, views, planes, rendered, scores, mesh)` is called after each object is scored (the
    report's pictures: `evaluation_report.Report.hook`), mesh the world-frame mesh or None.
    """

    def __init__(self, model: nn.Module, lpips_model: nn.Module, clip: ClipSimilarity | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 input_view: int | None = None, input_size: int = 512, render_size: int | None = None,
                 views_per_batch: int = 8, max_rays: int | None = None, seed: int = 0,
                 ground_truth: GroundTruthMeshes | None = None, mesh_resolution: int = 128,
                 mesh_threshold: float | None = 1.0, mesh_points: int = 10_000, log=None, on_object=None,
                 baselines: dict | None = None):
        from vfusion3d_lightning.inference import max_rays_for
        from vfusion3d_lightning.models.lrm import LRM

        if views_per_batch < 1:
            raise ValueError(f"views_per_batch must be >= 1, got {views_per_batch}")
        if mesh_resolution < 2:
            raise ValueError(f"mesh_resolution must be >= 2 grid points per axis, got {mesh_resolution}")
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.eval().to(self.device)
        if dtype != torch.float32 and isinstance(self.model, LRM):  # cast once what autocast casts every call
            self.model.cast_network_weights(dtype)
        self.lpips = lpips_model.to(self.device)
        self.clip = clip
        self.input_view, self.input_size, self.render_size = input_view, input_size, render_size
        self.views_per_batch, self.seed = views_per_batch, seed
        self.max_rays = max_rays or max_rays_for(self.model, self.device)
        self.ground_truth, self.mesh_resolution, self.mesh_threshold = ground_truth, mesh_resolution, mesh_threshold
        self.mesh_points = mesh_points
        # the constant background's scores by (object, input view): the same for every LRM, so evaluators of
        # several checkpoints may share this dict and score it once
        self.baselines = {} if baselines is None else baselines
        self.log = log or tqdm_write
        self.on_object = on_object

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def views(self, sample) -> dict:
        """`evaluation_views` of a sample with this evaluator's input view choice and sizes."""
        input_view = self.input_view
        if input_view is None:
            input_view = seeded_input_view(self.seed, sample.object_id, sample.num_views)
        return evaluation_views(sample, input_view, self.input_size, self.render_size)

    @torch.no_grad()
    def planes(self, views: dict) -> torch.Tensor:
        """The LRM's planes (1, 3, C, H, W) float32 of the input view of `views`."""
        with self._autocast():
            planes = self.model(views["input_image"][None].to(self.device),
                                views["source_camera"][None].to(self.device))
        return planes.float()

    def render(self, views: dict, planes: torch.Tensor | None = None, cameras: torch.Tensor | None = None,
               size: int | None = None) -> torch.Tensor:
        """`evaluation_views` output -> its novel views (`scored_views`) rendered from their cameras:
        (N - 1, 3, S, S) float32 in [0, 1]; or the given render `cameras` (V, 25) in the frame of `views`, at
        `size` (default S)."""
        return self.render_with_opacity(views, planes, cameras, size)[0]

    @torch.no_grad()
    def render_with_opacity(self, views: dict, planes: torch.Tensor | None = None,
                            cameras: torch.Tensor | None = None,
                            size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `render`, and the rendered opacity (V, 1, S, S) float32 of the same views."""
        if cameras is None:
            cameras = views["render_cameras"][views["scored_views"]]
        cameras = cameras[None].to(self.device)
        size = size or views["target_images"].shape[-1]
        generator = torch.Generator(self.device).manual_seed(self.seed)
        planes = self.planes(views) if planes is None else planes
        frames, opacities = [], []
        for start in range(0, cameras.shape[1], self.views_per_batch):
            with self._autocast():
                out = self.model.render(planes, cameras[:, start:start + self.views_per_batch], size,
                                        generator=generator, max_rays=self.max_rays)
            frames.append(out.rgb[0].float().clamp(0, 1))
            opacities.append(out.opacity[0].float().clamp(0, 1))
        return torch.cat(frames), torch.cat(opacities)

    def score(self, views: dict, rendered: torch.Tensor, opacity: torch.Tensor | None = None) -> ObjectScores:
        """Compare renders of the novel views (N - 1, 3, S, S) and their opacity (N - 1, 1, S, S; None: no
        opacity IoU) with their ground truth in `views`, and score the constant background on the same views."""
        target = views["target_images"][views["scored_views"]].to(rendered.device)
        alpha = views["target_masks"][views["scored_views"]].to(rendered.device)
        key = (views["object_id"], views["input_view"], tuple(target.shape))
        if key not in self.baselines:
            self.baselines[key] = constant_background_scores(target, alpha, self.lpips, self.views_per_batch)
        scores = ObjectScores(views["object_id"], **image_scores(rendered, target, self.lpips, self.views_per_batch),
                              input_view=views["input_view"], views=len(target), baseline=dict(self.baselines[key]))
        if opacity is not None:
            scores.opacity_iou = opacity_iou(opacity, alpha)
        if self.clip is not None:
            to_image, to_text = self.clip.similarities(views["input_image"], rendered, views["prompt"])
            scores.clip_image = to_image.mean().item()
            scores.clip_text = math.nan if to_text is None else to_text.mean().item()
        return scores

    @torch.no_grad()
    def mesh(self, planes: torch.Tensor):
        """The LRM's mesh (trimesh.Trimesh) of `planes` in the input camera's canonical frame, vertices in
        [-1, 1]; raises `NoSurfaceError` when the field has no surface at the threshold (None: the grid's
        median density, a level every field has)."""
        from vfusion3d_lightning.geometry.mesh import density_grid, extract_mesh

        threshold = self.mesh_threshold
        if threshold is None:
            threshold = float(density_grid(self.model, planes, self.mesh_resolution).median())
        return extract_mesh(self.model, planes, self.mesh_resolution, threshold, "coarse_to_fine")

    def turntable(self, views: dict, planes: torch.Tensor, frames: int = 24, size: int | None = None) -> torch.Tensor:
        """Frames (frames, 3, size, size) in [0, 1] from `turntable_cameras(views, frames)`."""
        return self.render(views, planes, turntable_cameras(views, frames), size)

    def geometry(self, views: dict, planes: torch.Tensor, scores: ObjectScores, planes_seconds: float = 0.0):
        """Fill `scores`' geometry fields: the mesh of `planes` (timed; `planes_seconds` the image -> planes
        time, added to `mesh_seconds`) against the asset's mesh. Returns that mesh in the world frame of the
        renders (None: no surface)."""
        from vfusion3d_lightning.geometry.mesh import NoSurfaceError
        from vfusion3d_lightning.geometry.metrics import mesh_metrics

        truth = self.ground_truth.load(views["object_id"], views["asset"])  # a missing asset fails first
        started = time.perf_counter()
        try:
            mesh = self.mesh(planes)
        except NoSurfaceError as err:
            scores.no_surface = True
            self.log(f"warning: {views['object_id']}: no mesh: {err} (--mesh_threshold)")
            return None
        finally:
            self._synchronize()
            scores.mesh_seconds = planes_seconds + time.perf_counter() - started
        # back into the world frame of the renders and the asset: p_world = R^T p_canonical (rows: p @ R)
        mesh.vertices = np.asarray(mesh.vertices, np.float64) @ views["world_rotation"].numpy()
        result = mesh_metrics(mesh, truth, points=self.mesh_points, thresholds=FSCORE_THRESHOLDS, seed=self.seed)
        scores.chamfer, scores.fscore = result.chamfer, dict(result.fscore)
        return mesh

    def evaluate_sample(self, sample) -> ObjectScores:
        """One `MultiViewSample` (all its views, with cameras) -> its scores (geometry with `ground_truth`)."""
        views = self.views(sample)
        self._synchronize()
        started = time.perf_counter()
        planes = self.planes(views)
        self._synchronize()
        planes_seconds = time.perf_counter() - started
        rendered, opacity = self.render_with_opacity(views, planes)
        scores = self.score(views, rendered, opacity)
        mesh = self.geometry(views, planes, scores, planes_seconds) if self.ground_truth is not None else None
        if self.on_object is not None:
            self.on_object(self, views, planes, rendered, scores, mesh)
        return scores

    def evaluate(self, samples: Iterable, max_objects: int | None = None, total: int | None = None,
                 desc: str = "evaluate") -> list[ObjectScores]:
        """Score the first `max_objects` samples (all when None), with a tqdm bar."""
        from itertools import islice

        from tqdm import tqdm

        if max_objects is not None:
            total = max_objects if total is None else min(total, max_objects)
        chosen = tqdm(islice(samples, max_objects), total=total, desc=desc, unit="object")
        return [self.evaluate_sample(sample) for sample in chosen]


def tqdm_write(line: str) -> None:
    """A line on stderr that does not break a tqdm bar."""
    from tqdm import tqdm

    tqdm.write(f"vfusion3d-lightning: {line}", file=sys.stderr)


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
    """One row per object, columns CSV_FIELDS: object_id, input_view, the image then geometry metrics, the
    constant background's image metrics (`baseline_*`), mesh_seconds, no_surface, views (the number of scored,
    novel views)."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(item.row() for item in scores)

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


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


SET_PREFIXES = ("real", "gso", "omniobject3d")  # file-name prefixes `eval-set` gives its sets


def object_set(object_id: str) -> str:
    """The evaluation set of an object, by the prefix `eval-set` gave its file: real, gso, omniobject3d, or
    other (procedural and users' own assets)."""
    prefix = object_id.split("_", 1)[0]
    return prefix if prefix in SET_PREFIXES and "_" in object_id else "other"


def _by_set(name: str, scores: list[ObjectScores]) -> list[tuple[str, list[ObjectScores]]]:
    """The checkpoint's row, then one row per evaluation set when the objects come from several."""
    sets = sorted({object_set(s.object_id) for s in scores})
    rows = [(name, scores)]
    if len(sets) > 1:
        rows += [(f"{name}: {label}", [s for s in scores if object_set(s.object_id) == label]) for label in sets]
    return rows


def summary_tables(results: dict[str, list[ObjectScores]], geometry: bool = True) -> list[list[list[str]]]:
    """The summary's tables, each a header row then one row per checkpoint (and per evaluation set,
    `object_set`, when the objects come from several): objects, scored views per object and mean ± std over
    objects of each image metric, then the same rows of the constant background prediction (BASELINE: the first
    checkpoint's objects; every checkpoint is scored on the same views); with `geometry` a second table: objects
    with a mesh compared, objects whose field had no surface, mean ± std of Chamfer, each F-score and mesh
    seconds (n/a where none was measured)."""
    image = [["checkpoint", "objects", "views", *(LABELS[m] for m in IMAGE_METRICS)]]
    first = next(iter(results.values()), [])
    rows = {**results, BASELINE: [s.baseline_scores() for s in first]} if first else results
    for name, all_scores in rows.items():
        for label, scores in _by_set(name, all_scores):
            counts = sorted({s.views for s in scores})
            views = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            image.append([label, str(len(scores)), views,
                          *(mean_std([s.value(m) for s in scores]) for m in IMAGE_METRICS)])
    if not geometry:
        return [image]
    shape = [["checkpoint", "meshes", "no surface", *(LABELS[m] for m in GEOMETRY_METRICS), "mesh seconds"]]
    for name, all_scores in results.items():
        for label, scores in _by_set(name, all_scores):
            meshes = sum(math.isfinite(s.chamfer) for s in scores)
            shape.append([label, f"{meshes}/{len(scores)}", str(sum(s.no_surface for s in scores)),
                          *(mean_std([s.value(m) for s in scores]) for m in GEOMETRY_METRICS),
                          mean_std([s.mesh_seconds for s in scores])])
    return [image, shape]


def summary_table(results: dict[str, list[ObjectScores]], geometry: bool = True) -> str:
    """`summary_tables` as Markdown, the tables one blank line apart."""
    blocks = ["\n".join([_markdown_row(header), "|" + " --- |" * len(header), *map(_markdown_row, rows)])
              for header, *rows in summary_tables(results, geometry)]
    return "\n\n".join(blocks) + "\n"


def baseline_gains(results: dict[str, list[ObjectScores]]) -> str:
    """One line per checkpoint: its mean PSNR gain over the constant background (mean over objects of the
    per-object difference, same views) and its mean opacity IoU against the background's."""
    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    lines = []
    for name, scores in results.items():
        gain = mean([s.psnr - s.value("baseline_psnr") for s in scores])
        ours, theirs = mean([s.opacity_iou for s in scores]), mean([s.value("baseline_opacity_iou") for s in scores])
        lines.append(f"{name}: PSNR {gain:+.2f} dB over the {BASELINE}, opacity IoU {ours:.4f} (the {BASELINE}'s "
                     f"{theirs:.4f}).")
    return "\n".join(lines) + "\n"


def plot_distributions(results: dict[str, list[ObjectScores]], directory: str | Path) -> list[Path]:
    """`<metric>.png` per metric with any finite value (`fscore_0.1.png` for fscore@0.1): one box (and its
    points) per checkpoint."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for metric in METRICS:
        data = {name: [v for s in scores if math.isfinite(v := s.value(metric))] for name, scores in results.items()}
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
        file = Path(directory) / f"{metric.replace('@', '_')}.png"
        written.append(atomic_write(file, lambda tmp: tmp.write_bytes(buffer.getvalue())))
    return written


def checkpoint_names(sources: list[str]) -> list[str]:
    """Short unique folder-safe names: the file stem or folder name, numbered where two clash."""
    names: list[str] = []
    for source in sources:
        path = Path(source)
        if path.name in ("", ".", ".."):  # `.` or `..` would name a folder outside `out`: the folder's own name
            path = path.resolve()
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem if path.suffix in (".ckpt", ".safetensors", ".pt", ".pth")
                      else path.name).lstrip(".") or "checkpoint"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names
