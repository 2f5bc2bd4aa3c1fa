"""Small multi-view samples made in memory: each view's red channel encodes its index."""

import numpy as np
import pytest

from vfusion3d_lightning.cameras import Intrinsics, orbit_azimuths, orbit_poses
from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter


def make_sample(key: str, n_views: int = 16, size: int = 24, with_cameras: bool = True,
                elevation: float = 0.3, prompt: str | None = "a red cube") -> MultiViewSample:
    images = np.zeros((n_views, size, size, 4), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 3) ** 2
    for i in range(n_views):
        images[i, ..., 0] = 7 * i
        images[i, ..., 1] = 100
        images[i, ..., 2] = 200
        images[i, ..., 3] = np.where(disk, 255, 0)
    offset = 0.1 * (sum(map(ord, key)) % 7)
    k = Intrinsics(0.75 * size, 0.75 * size, size / 2, size / 2, size, size).matrix().numpy()
    return MultiViewSample(
        key=key,
        object_id=f"object-{key}",
        source="3d",
        images=images,
        cam2world=orbit_poses(n_views, elevation, 1.5, offset).numpy() if with_cameras else None,
        intrinsics=np.repeat(k[None], n_views, axis=0) if with_cameras else None,
        elevations=np.full(n_views, elevation, dtype=np.float32),
        azimuths=orbit_azimuths(n_views, offset).numpy(),
        prompt=prompt,
        quality=0.9,
        extra={"renderer": "test"},
    )


def write_shards(directory, n_shards: int, per_shard: int, **sample_kwargs) -> list[str]:
    keys = []
    with ShardWriter(directory, maxcount=per_shard) as writer:
        for i in range(n_shards * per_shard):
            key = f"obj{i:04d}"
            writer.write_sample(make_sample(key, **sample_kwargs))
            keys.append(key)
    return keys


@pytest.fixture
def sample_factory():
    return make_sample


@pytest.fixture
def shard_factory():
    return write_shards

