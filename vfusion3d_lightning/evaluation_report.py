"""report.html of an `evaluate` run: a page to judge LRMs by eye, next to their numbers.

Top: the summary tables (`evaluation.summary_tables`, the numbers of summary.md) and the box plots. Then per
held-out object (the first `max_objects`), one row of ground truth (the input view given to the LRM and
`TRUTH_VIEWS` scored views spread over the rig) and per checkpoint one row of its renders from the same
cameras, a turntable through the input view (animated WebP: it plays in any browser, where H.264 may not),
the extracted mesh seen from two sides (the renderer of the data, `data.render.MeshRenderer`) with a link to
the mesh file, and that object's metrics; the ground truth row carries the constant background prediction's
scores on the same views (`evaluation.BASELINE`), the figures to beat.

Pictures are written as each object is evaluated (`Report.hook` is the `Evaluator`'s `on_object`), so memory
holds one object's images at a time. They go to a hidden `.report.partial-*` folder in `<out>` that replaces
`<out>/report/` when the page is written: an evaluation that fails leaves `<out>` as it was, one that is killed
leaves a folder that `io.remove_partials` clears. The page links the pictures by relative paths: no network
resources, the style inside the page. Every string from the data (object ids, prompts, checkpoint names) goes
through `html.escape`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import math
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vfusion3d_lightning.evaluation import (
    BASELINE,
    BASELINE_METRICS,
    GEOMETRY_METRICS,
    IMAGE_METRICS,
    LABELS,
    ObjectScores,
    summary_tables,
)
from vfusion3d_lightning.io import PARTIAL, atomic_write, to_uint8_images

TRUTH_VIEWS = 4  # scored views shown per object, spread over the rig
MAX_SIZE = 256  # pictures larger than this are shrunk: the page shows hundreds of them
TURNTABLE_FRAMES = 24
TURNTABLE_MS = 100  # per frame
MESH_SIZE = 256  # per mesh view
MESH_ELEVATION = math.radians(20)


def folder_name(index: int, object_id: str) -> str:
    """`0003_chair-1a2b3c4d`: the object's place in the shards (unique), a file-safe id, a hash of the id (two
    ids that differ only in unsafe characters stay apart)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", object_id)[:40].lstrip(".") or "object"
    return f"{index:04d}_{safe}-{zlib.crc32(object_id.encode()):08x}"


def _picture(image: torch.Tensor | np.ndarray, size: int | None = None) -> Image.Image:
    """(3, H, W) in [0, 1] or (H, W, 3|4) uint8 -> a PIL image at most `size` (default MAX_SIZE) wide."""
    array = to_uint8_images(image) if isinstance(image, torch.Tensor) else image
    picture = Image.fromarray(array)
    size = size or MAX_SIZE
    if picture.width > size:
        picture = picture.resize((size, round(picture.height * size / picture.width)), Image.Resampling.LANCZOS)
    return picture


def write_png(path: Path, image: torch.Tensor | np.ndarray, size: int | None = None) -> Path:
    picture = _picture(image, size)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def write_turntable(path: Path, frames: torch.Tensor) -> Path:
    """Frames (F, 3, H, W) in [0, 1] -> an animated WebP that loops."""
    pictures = [_picture(frame) for frame in frames]
    return atomic_write(path, lambda tmp: pictures[0].save(tmp, format="WEBP", save_all=True,
                                                           append_images=pictures[1:], duration=TURNTABLE_MS,
                                                           loop=0, quality=85))


def mesh_views(renderer, mesh, azimuth: float) -> np.ndarray:
    """The mesh (world frame, +z up) from its front (`azimuth`, the input camera's) and its back, side by side on
    white: (MESH_SIZE, 2 MESH_SIZE, 3) uint8. The mesh is centred and framed to fill the view, so a mesh at the
    wrong scale is still seen (the metrics judge the scale)."""
    from vfusion3d_lightning.cameras import look_at, spherical_to_cartesian
    from vfusion3d_lightning.data.render import default_intrinsics

    vertices = np.asarray(mesh.vertices, np.float64)
    centre = (vertices.min(0) + vertices.max(0)) / 2
    radius = max(float(np.linalg.norm(vertices - centre, axis=1).max()), 1e-6)
    intrinsics = default_intrinsics(MESH_SIZE)
    half_fov = math.atan(intrinsics.cx / intrinsics.fx)
    distance = 1.05 * radius / math.sin(half_fov)
    azimuths = torch.tensor([azimuth, azimuth + math.pi])
    positions = spherical_to_cartesian(azimuths, torch.full_like(azimuths, MESH_ELEVATION), distance)
    poses = look_at(positions).double().numpy()
    poses[:, :3, 3] += centre
    rgba = renderer.render(mesh, poses, intrinsics).astype(np.float32) / 255
    rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])  # on white
    return np.round(np.concatenate(list(rgb), axis=1) * 255).astype(np.uint8)


@dataclasses.dataclass
class Shown:
    """One object of the page: its ground truth pictures and, per checkpoint, its pictures and scores."""

    object_id: str
    prompt: str | None
    input_view: int
    truth: dict[int, str]  # view -> picture, relative to the out folder; the input view first
    checkpoints: dict[str, dict] = dataclasses.field(default_factory=dict)


class Report:
    """Collects an `evaluate` run's pictures for `<out>/report/` and writes `<out>/report.html`.

    `hook(name)` is the `Evaluator.on_object` of checkpoint `name`: it writes the pictures of that checkpoint's
    first `max_objects` objects as they are scored (into a staging folder) and counts the rest. `write(...)`
    puts them in place and writes the page; `close()` releases the mesh renderer and removes the pictures of a
    run that did not get as far as `write`."""

    def __init__(self, out: str | Path, max_objects: int = 16):
        if max_objects < 0:
            raise ValueError(f"report_objects must be >= 0, got {max_objects}")
        self.out, self.max_objects = Path(out), max_objects
        self.shown: list[Shown] = []
        self.counted: dict[str, int] = {}
        self._renderer = None
        self._staging: Path | None = None
        self._made_out = False

    @property
    def staging(self) -> Path:
        """`<out>/.report.partial-*/`, made at the first picture: its `report/` replaces `<out>/report/`."""
        if self._staging is None:
            self._made_out = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(dir=self.out, prefix=f".report{PARTIAL}-"))
        return self._staging

    def hook(self, checkpoint: str):
        self.counted[checkpoint] = 0

        def on_object(evaluator, views: dict, planes, rendered, scores: ObjectScores, mesh) -> None:
            index = self.counted[checkpoint]
            self.counted[checkpoint] += 1
            if index < self.max_objects:
                self.add(checkpoint, index, evaluator, views, planes, rendered, scores, mesh)

        return on_object

    def add(self, checkpoint: str, index: int, evaluator, views: dict, planes: torch.Tensor, rendered: torch.Tensor,
            scores: ObjectScores, mesh) -> None:
        """Write one object's pictures for one checkpoint (its ground truth once, with the first checkpoint)."""
        name = folder_name(index, views["object_id"])
        scored = views["scored_views"].tolist()
        chosen = [scored[int(i)] for i in np.linspace(0, len(scored) - 1, min(TRUTH_VIEWS, len(scored))).round()]
        if index == len(self.shown):  # the first checkpoint to reach this object
            folder = self.staging / "report" / "ground-truth" / name
            truth = {views["input_view"]: write_png(folder / "input.png", views["input_image"])}
            truth |= {v: write_png(folder / f"view_{v:02d}.png", views["target_images"][v]) for v in chosen}
            self.shown.append(Shown(views["object_id"], views["prompt"], views["input_view"],
                                    {v: _relative(p, self.staging) for v, p in truth.items()}))
        shown = self.shown[index]
        if shown.object_id != views["object_id"]:
            raise RuntimeError(f"object {index} is {views['object_id']!r} for {checkpoint} but {shown.object_id!r} "
                               "for the checkpoint before: the shards changed during the evaluation")
        folder = self.staging / "report" / "checkpoints" / checkpoint / name
        files = {v: write_png(folder / f"view_{v:02d}.png", rendered[scored.index(v)]) for v in chosen}
        frames = evaluator.turntable(views, planes, TURNTABLE_FRAMES, min(rendered.shape[-1], MAX_SIZE))
        files["turntable"] = write_turntable(folder / "turntable.webp", frames)
        if mesh is not None:
            from vfusion3d_lightning.geometry.mesh import export_mesh

            files["mesh_file"] = export_mesh(mesh, folder / "mesh.glb")
            forward = views["world_rotation"][0].tolist()  # the input camera's direction in the world
            azimuth = math.atan2(forward[1], forward[0])
            files["mesh"] = write_png(folder / "mesh.png", mesh_views(self.renderer, mesh, azimuth), 2 * MESH_SIZE)
        shown.checkpoints[checkpoint] = {"files": {k: _relative(p, self.staging) for k, p in files.items()},
                                         "scores": scores}

    @property
    def renderer(self):
        if self._renderer is None:  # an OpenGL context only when there is a mesh to show
            from vfusion3d_lightning.data.render import MeshRenderer

            self._renderer = MeshRenderer(MESH_SIZE)
        return self._renderer

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._staging is not None:  # a run that failed before `write`: no trace of it
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
            if self._made_out:
                with contextlib.suppress(OSError):  # only if nothing else was written there
                    self.out.rmdir()

    def _put_in_place(self) -> None:
        """The staged pictures become `<out>/report/` (an earlier run's is removed: the page is the index)."""
        final = self.out / "report"
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=self.out, prefix=f".report{PARTIAL}-old-"))
            final.rename(old / "report")
            shutil.rmtree(old)
        if self._staging is not None:
            if (self._staging / "report").exists():
                (self._staging / "report").rename(final)
            shutil.rmtree(self._staging)
            self._staging = None

    def write(self, results: dict[str, list[ObjectScores]], geometry: bool, note: str, plots: list[Path],
              meshes: bool = False) -> Path:
        """report.html in the out folder: summary tables (`geometry`: with the geometry table and columns), `note`
        (the protocol, as in summary.md), the `plots` and the objects shown (`meshes`: with a mesh column, for
        a run whose geometry track extracted meshes)."""
        total = max((len(s) for s in results.values()), default=0)
        body = [f"<h1>Evaluation report: {len(results)} checkpoint{'s' * (len(results) != 1)}, {total} objects</h1>",
                *(_table(rows) for rows in summary_tables(results, geometry)),
                "<p class=note>Per object: " + ", ".join(
                    f'<a href="{html.escape(name)}/objects.csv">{html.escape(name)}/objects.csv</a>'
                    for name in results) + "</p>",
                "".join(f"<p class=note>{html.escape(line)}</p>" for line in note.strip().splitlines()),
                '<div class="plots">' + "".join(
                    f'<img src="{html.escape(_relative(p, self.out))}" alt="{html.escape(p.stem)}">'
                    for p in plots) + "</div>"]
        shown = len(self.shown)
        cap = (f" (the first {shown} of {total} objects scored; --report_objects shows more)" if shown < total
               else "")
        body.append(f"<h2>Objects{html.escape(cap)}</h2>")
        metrics = [*IMAGE_METRICS, *(GEOMETRY_METRICS if geometry else ())]
        body += [self._object(item, list(results), metrics, meshes) for item in self.shown]
        page = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>VFusion3D evaluation</title>"
                f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
        self._put_in_place()
        return atomic_write(self.out / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))

    def _object(self, item: Shown, checkpoints: list[str], metrics: list[str], meshes: bool) -> str:
        e = html.escape
        views = list(item.truth)
        prompt = f'<span class="prompt">“{e(item.prompt)}”</span>' if item.prompt else ""
        head = "".join([f"<th>input: view {item.input_view}</th>",
                        *(f"<th>view {v}</th>" for v in views[1:]), "<th>turntable</th>",
                        "<th>mesh (front, back)</th>" if meshes else "", "<th>metrics</th>"])
        cells = [_img(item.truth[v], f"ground truth view {v}") for v in views]
        first = next((item.checkpoints[n] for n in checkpoints if n in item.checkpoints), None)
        baseline = ("" if first is None else f"{e(BASELINE)}:"
                    + _metrics(first["scores"].baseline_scores(), [m for m in metrics if m in BASELINE_METRICS]))
        rows = [f"<tr><th class=rowname>ground truth</th>{''.join(f'<td>{c}</td>' for c in cells)}"
                f"<td></td>{'<td></td>' if meshes else ''}<td class=baseline>{baseline}</td></tr>"]
        for name in checkpoints:
            entry = item.checkpoints.get(name)
            if entry is None:
                continue
            files, scores = entry["files"], entry["scores"]
            cells = ['<td class="blank">given</td>', *(f"<td>{_img(files[v], f'{name} view {v}')}</td>"
                                                      for v in views[1:]),
                     f"<td>{_img(files['turntable'], f'{name} turntable')}</td>"]
            if meshes:
                mesh = (f'{_img(files["mesh"], f"{name} mesh", "mesh")}<br><a href="{e(files["mesh_file"])}">'
                        "mesh.glb</a>" if "mesh" in files else
                        "no surface at the mesh threshold" if scores.no_surface else "n/a")
                cells.append(f"<td>{mesh}</td>")
            cells.append(f"<td>{_metrics(scores, metrics)}</td>")
            rows.append(f"<tr><th class=rowname>{e(name)}</th>{''.join(cells)}</tr>")
        return (f'<section class="object"><h3>{e(item.object_id)} {prompt}</h3>'
                f'<table class="views"><tr><th></th>{head}</tr>{"".join(rows)}</table></section>')


def _relative(path: Path, out: Path) -> str:
    return Path(path).resolve().relative_to(out.resolve()).as_posix()


def _img(src: str, alt: str, kind: str = "view") -> str:
    return f'<img class="{kind}" src="{html.escape(Path(src).as_posix())}" alt="{html.escape(alt)}">'


def _table(rows: list[list[str]]) -> str:
    header, *body = rows
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="summary"><tr>{cells}</tr>{lines}</table>'


def _metrics(scores: ObjectScores, metrics: list[str]) -> str:
    def number(value: float) -> str:
        return "n/a" if not math.isfinite(value) else f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"

    rows = "".join(f"<tr><td>{html.escape(LABELS[m])}</td><td>{number(scores.value(m))}</td></tr>" for m in metrics)
    return f'<table class="metrics">{rows}</table>'


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; } h3 { font-size: 15px; margin: 0 0 8px; }
table.summary { border-collapse: collapse; margin: 12px 0; background: #fff; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
table.summary th { background: #eee; }
p.note { color: #555; margin: 4px 0; max-width: 1100px; }
.plots img { height: 220px; margin: 8px 8px 0 0; border: 1px solid #ddd; background: #fff; }
section.object { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 12px; margin: 16px 0;
  overflow-x: auto; }
.prompt { font-weight: normal; color: #555; font-style: italic; }
table.views { border-collapse: collapse; }
table.views th { font-weight: 600; font-size: 12px; color: #555; padding: 2px 6px; text-align: center; }
table.views th.rowname { text-align: right; vertical-align: middle; min-width: 80px; max-width: 140px;
  overflow-wrap: anywhere; }
table.views td { padding: 4px; text-align: center; vertical-align: middle; }
td.blank { color: #999; font-size: 12px; }
td.baseline { color: #777; font-size: 12px; }
img.view { width: 120px; height: 120px; image-rendering: auto; border: 1px solid #e4e4e4; background: #fff; }
img.mesh { width: 240px; height: 120px; border: 1px solid #e4e4e4; }
table.metrics { border-collapse: collapse; font-size: 12px; }
table.metrics td { padding: 0 6px; text-align: right; white-space: nowrap; }
table.metrics td:first-child { text-align: left; color: #555; }
"""
