"""Procedural assets -> rendered shards -> DataModule batches, with resume and failure reporting."""

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from vfusion3d_lightning.cameras import canonical_source_camera
from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data.datamodules import MultiViewDataModule, VideoDataModule
from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render_shards import RenderSettings, find_assets, render_folder, sample_key
from vfusion3d_lightning.data.schema import complete_shards, keys_in_shards, read_samples


def test_assets_render_to_shards_that_feed_both_datamodules(tmp_path):
    assets, shards = tmp_path / "assets", tmp_path / "shards"
    write_assets(assets, 6, seed=1)
    (assets / "broken.obj").write_text("v 0 0 0\nthis is not an obj file\n")
    report = render_folder(assets, shards, RenderSettings(resolution=32), workers=2, shard_size=4, progress=False)
    assert report.written == 6 and report.skipped_existing == 0
    assert [f["asset"].endswith("broken.obj") for f in report.failed] == [True]
    assert len(complete_shards(shards)) == 2
    # in the assets' order whichever worker finished first
    assert list(keys_in_shards(complete_shards(shards)).values()) == [
        [sample_key(p) for p in find_assets(assets) if p.name != "broken.obj"][i:i + 4] for i in (0, 4)]
    saved = json.loads((shards / "render_report.json").read_text())
    assert saved["written"] == 6 and "broken.obj" in saved["failed"][0]["asset"]

    # a rerun renders nothing that is already in a complete shard
    again = render_folder(assets, shards, RenderSettings(resolution=32), workers=1, progress=False)
    assert again.written == 0 and again.skipped_existing == 6 and len(complete_shards(shards)) == 2

    dm = MultiViewDataModule(str(shards / "shard-*.tar"), batch_size=3, num_workers=2, num_supervision_views=4,
                             input_size=28, supervision_size=32)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 6 samples: 3 per worker, one batch each
    batch = batches[0]
    assert batch["input_image"].shape == (3, 3, 28, 28) and batch["target_images"].shape == (3, 4, 3, 32, 32)
    assert torch.allclose(batch["source_camera"], canonical_source_camera(3))
    # the object covers part of each view, the white background the rest
    coverage = batch["target_masks"].mean(dim=(2, 3, 4))
    assert (coverage > 0.02).all() and (coverage < 0.8).all()
    video = VideoDataModule(str(shards / "shard-*.tar"), batch_size=2, num_workers=0, frame_size=32)
    clip = next(iter(video.train_dataloader()))
    assert clip["frames"].shape == (2, 16, 3, 32, 32)
    assert ((clip["elevation"] >= 0) & (clip["elevation"] <= torch.pi / 4)).all()


def test_cli_makes_assets_and_renders_supervision_sets(tmp_path, capsys):
    assert main(["procedural", "--out", str(tmp_path / "a"), "--count", "2", "--formats", "[ply]"]) == 0
    assert main(["render", "--assets", str(tmp_path / "a"), "--out", str(tmp_path / "s"), "--views", "random32",
                 "--resolution", "16", "--workers", "1"]) == 0
    assert "rendered 2, already present 0, failed 0" in capsys.readouterr().out
    dm = MultiViewDataModule(str(tmp_path / "s" / "shard-000000.tar"), batch_size=2, num_workers=0,
                             input_size=16, supervision_size=16)
    assert next(iter(dm.train_dataloader()))["render_cameras"].shape == (2, 4, 25)


def test_a_script_without_the_main_guard_gets_an_error_not_a_hang(tmp_path):
    # spawn runs the script again in each rendering process, which then fails to start its own; a Pool
    # would replace the dead worker and wait forever
    write_assets(tmp_path / "assets", 1, seed=2)
    script = tmp_path / "render_script.py"
    script.write_text(textwrap.dedent(f"""
        from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder
        render_folder({str(tmp_path / "assets")!r}, {str(tmp_path / "shards")!r}, RenderSettings(resolution=16),
                      workers=1, progress=False)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "a rendering process died" in done.stderr and 'if __name__ == "__main__":' in done.stderr


def _camera_azimuths(cam2world: np.ndarray) -> np.ndarray:
    """Azimuths of the camera positions themselves (offset noise included), in [0, 2 pi)."""
    return np.arctan2(cam2world[:, 1, 3], cam2world[:, 0, 3]).astype(np.float64) % (2 * math.pi)


def test_orbit16_starts_at_azimuth_0_and_steps_evenly(tmp_path):
    assets = tmp_path / "assets"
    write_assets(assets, 3, seed=4, formats=("glb", "obj"), progress=False)
    for start in ("zero", "random"):
        out = tmp_path / start
        assert main(["render", "--assets", str(assets), "--out", str(out), "--views", "orbit16", "--resolution",
                     "16", "--workers", "1", "--progress", "false", "--orbit_start", start]) == 0
        samples = list(read_samples(complete_shards(out)))
        assert len(samples) == 3
        for sample in samples:
            nominal = np.arange(16) * 2 * math.pi / 16
            azimuths = sample.azimuths.astype(np.float64)
            np.testing.assert_allclose(np.diff(azimuths) % (2 * math.pi), 2 * math.pi / 16, atol=1e-5)
            assert len(set(sample.elevations.tolist())) == 1 and 0.0 <= sample.elevations[0] <= math.pi / 4
            # the cameras themselves: on the recorded azimuths up to the offset noise (0.05 at radius 1.5)
            error = (_camera_azimuths(sample.cam2world) - azimuths + math.pi) % (2 * math.pi) - math.pi
            assert np.abs(error).max() < 0.06
            if start == "zero":  # the paper's orbit: the first view is the azimuth-0 (+x) camera
                assert azimuths[0] == 0.0
                np.testing.assert_allclose(azimuths, nominal, atol=1e-5)
            else:
                assert azimuths[0] > 0.06
        if start == "random":
            assert len({round(float(s.azimuths[0]), 4) for s in samples}) == 3  # each object its own start


def test_render_settings_reject_unknown_up_axis_and_orbit_start():
    with pytest.raises(ValueError, match="up must be one of"):
        RenderSettings(up="x")
    with pytest.raises(ValueError, match="orbit_start must be one of"):
        RenderSettings(orbit_start="half")
