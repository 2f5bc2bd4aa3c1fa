"""Procedural assets rendered by our own renderer, as shards for the training tests."""

from pathlib import Path

import pytest

from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder


def render_procedural_shards(root: Path, count: int, seed: int, views: str, resolution: int,
                             style: str = "tumbled", shard_size: int = 2) -> str:
    """Render `count` procedural assets into shards under `root`; returns the shard pattern."""
    write_assets(root / "assets", count, seed=seed, progress=False, style=style)
    render_folder(root / "assets", root / views, RenderSettings(views=views, resolution=resolution), workers=1,
                  shard_size=shard_size, progress=False)
    return str(root / views / "shard-*.tar")


@pytest.fixture(scope="session")
def procedural_shards():
    return render_procedural_shards
