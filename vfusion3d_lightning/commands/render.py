"""`vfusion3d-lightning render`: a folder of 3D assets into multi-view shards (resumable)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from vfusion3d_lightning.data.render_shards import (
    REPORT_NAME,
    RenderSettings,
    find_assets,
    part_file,
    render_folder,
    sample_key,
)
from vfusion3d_lightning.data.schema import Part, ShardJobReport, is_held_out


def render(assets: Path, out: Path, views: Literal["orbit16", "random32", "uniform32"] = "orbit16",
           resolution: int = 256, radius: float = 1.5, seed: int = 0, image_format: Literal["png", "jpg"] = "png",
           workers: int = 2, shard_size: int = 256, progress: bool = True, timeout_s: float | None = 600.0,
           retry_failed: bool = False, up: Literal["y", "z"] = "y",
           orbit_start: Literal["zero", "random"] = "zero", part: str | None = None, held_out: float = 0.0,
           held_out_views: Literal["orbit16", "random32", "uniform32"] = "uniform32",
           ) -> ShardJobReport | dict[str, ShardJobReport]:
    """Render each asset of a folder into multi-view shards; a rerun skips assets already in complete shards.
    With --held_out F, a fraction F of the assets is held out: OUT/train gets the rest (--views), OUT/held_out
    those (--held_out_views), for training and evaluating on different objects.

    Args:
        assets: folder of .glb/.gltf/.obj/.ply files (searched recursively).
        out: folder for shard-NNNNNN.tar files and render_report.json.
        views: `orbit16`: the paper's 16-view orbit; `random32`/`uniform32`: LRM supervision sets.
        resolution: image size in pixels.
        radius: camera distance; assets are scaled into [-0.5, 0.5]^3.
        seed: seeds elevations, noise and random views.
        image_format: `jpg` stores a mask PNG beside each view.
        workers: rendering processes.
        shard_size: samples per shard.
        progress: show a progress bar.
        timeout_s: seconds one asset may take; one that takes longer (or kills its rendering process) is skipped
            and recorded in `render_failures.jsonl`, which reruns read to skip it. None: no limit.
        retry_failed: render the assets recorded in `render_failures.jsonl` again.
        up: the files' up axis. `y` (glTF's by its specification, and most tools' OBJ/PLY): file +y becomes the
            world's +z (up) and file +z (a glTF model's front) the world's +x, where the azimuth-0 camera is.
            `z`: files already +z up, loaded unrotated.
        orbit_start: `zero`: orbit16 starts at azimuth 0 (the +x camera) and steps 2*pi/16, as the paper's first
            frame is the 0-azimuth view; `random`: each object's orbit starts at a random azimuth.
        part: `I/N` renders part I of N (1-based) of the assets, dealt by a hash of each asset's name, into shards
            numbered I-1, I-1+N, ...: N machines (a SLURM array) render one folder together, and the union of
            the parts equals one run without parts. Each part keeps its own report and failure log
            (`render_report.part-I-of-N.json`).
        held_out: the fraction of assets to hold out (0: no split, all into OUT). An asset's side comes from a
            hash of its name alone: it stays on its side when assets are added, and on every machine.
        held_out_views: the held-out assets' views (uniform32: the evaluation's 32 views around the object).
    """
    settings = RenderSettings(views=views, resolution=resolution, radius=radius, seed=seed, image_format=image_format,
                              up=up, orbit_start=orbit_start)
    chosen = Part.parse(part) if part is not None else None
    if not held_out:
        return _render(assets, out, settings, chosen, None, workers=workers, shard_size=shard_size,
                       progress=progress, timeout_s=timeout_s, retry_failed=retry_failed)
    if not 0 < held_out < 1:
        raise ValueError(f"--held_out {held_out}: the fraction of assets to hold out must be in (0, 1), e.g. 0.1")
    keys = [sample_key(path) for path in find_assets(Path(assets))]
    held = sum(is_held_out(key, held_out) for key in keys)
    if not 0 < held < len(keys):
        side = "none" if held == 0 else "all"
        raise ValueError(f"--held_out {held_out} holds out {side} of the {len(keys)} assets in {assets}: "
                         f"{'raise' if held == 0 else 'lower'} it, or add assets")
    splits = {"train": (settings, lambda key: not is_held_out(key, held_out)),
              "held_out": (replace(settings, views=held_out_views), lambda key: is_held_out(key, held_out))}
    return {name: _render(assets, out / name, chosen_settings, chosen, keep, workers=workers, shard_size=shard_size,
                          progress=progress, timeout_s=timeout_s, retry_failed=retry_failed)
            for name, (chosen_settings, keep) in splits.items()}


def _render(assets: Path, out: Path, settings: RenderSettings, part: Part | None, keep, **options) -> ShardJobReport:
    report = render_folder(assets, out, settings, part=part, keep=keep, **options)
    print(f"rendered {report.written}, already present {report.skipped_existing}, failed {len(report.failed)} "
          f"-> {out} (report: {part_file(REPORT_NAME, part)})")
    return report
