"""`vfusion3d-lightning procedural`: seeded procedural 3D assets."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from vfusion3d_lightning.data.procedural import AssetStyle, write_assets

MeshFormat = Literal["glb", "obj", "ply"]


def procedural(out: Path, count: int = 100, seed: int = 0,
               formats: list[MeshFormat] = ["glb", "obj", "ply"],  # noqa: B006 (jsonargparse reads the default)
               style: AssetStyle = "tumbled", prefix: str = "asset",
               progress: bool = True) -> list[Path]:
    """Write seeded procedural 3D assets (GLB, OBJ, PLY), cycling through `formats`.

    Files are +y up, as glTF's specification has it, which `render` reads by default (`--up y`).

    Args:
        out: folder for the asset files.
        count: how many assets.
        seed: the same seed gives the same assets.
        formats: file formats to write, in turn.
        style: `upright`: parts stand on a base, so views show the camera's elevation; `tumbled`: random poses;
            `solid`: one upright primitive of one saturated colour (the quickstart's: learnable in minutes).
        prefix: file names `<prefix>_NNNNNN`; the stem is the object id, so give sets used together (training and
            held out) distinct prefixes.
        progress: show a progress bar.
    """
    paths = write_assets(out, count, seed=seed, formats=tuple(formats), style=style, progress=progress,
                         prefix=prefix)
    print(f"{len(paths)} procedural assets in {out}")
    return paths
