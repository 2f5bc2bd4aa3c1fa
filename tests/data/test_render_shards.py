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
from vfusion3d_lightning.data.schema import Part, complete_shards, keys_in_shards, read_samples


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


def shard_members(folder) -> dict[str, bytes]:
    """Every member of every complete shard, by name: the samples' bytes, whichever shard holds them."""
    import tarfile

    found = {}
    for path in complete_shards(folder):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.name not in found, f"{member.name} in two shards"
                found[member.name] = tar.extractfile(member).read()
    return found


def test_parts_render_a_shared_folder_whose_union_equals_one_run(tmp_path, capsys):
    assets, whole, parted = tmp_path / "assets", tmp_path / "whole", tmp_path / "parted"
    write_assets(assets, 9, seed=3, formats=("ply",))
    settings = RenderSettings(views="random32", resolution=16)
    render_folder(assets, whole, settings, workers=1, shard_size=2, progress=False)
    # a killed part 2 left its shard-in-flight: part 1 must leave it alone, part 2 remove it
    parted.mkdir()
    (parted / "shard-000001.tar.partial").write_bytes(b"cut")
    reports = []
    for index in (1, 2, 3):
        assert main(["render", "--assets", str(assets), "--out", str(parted), "--views", "random32", "--resolution",
                     "16", "--workers", "1", "--shard_size", "2", "--part", f"{index}/3", "--progress", "false"]) == 0
        if index == 1:
            assert (parted / "shard-000001.tar.partial").exists()
        reports.append(json.loads((parted / f"render_report.part-{index}-of-3.json").read_text()))
    assert "-> " + str(parted) + " (report: render_report.part-3-of-3.json)" in capsys.readouterr().out
    assert not list(parted.glob("*.partial")) and not (parted / "render_report.json").exists()
    assert sum(r["written"] for r in reports) == 9 and all(r["written"] >= 1 for r in reports)  # each part some
    # each part's numbers only (part I: I-1, I-1+3, ...), and the samples byte for byte those of one run
    by_part = keys_in_shards(complete_shards(parted))
    for path, keys in by_part.items():
        index = int(path.name[6:12]) % 3 + 1
        assert all(Part(index, 3).owns_key(key) for key in keys), (path.name, keys)
    assert shard_members(parted) == shard_members(whole)

    # a rerun of a part skips what it rendered; a part's number is never written over
    again = render_folder(assets, parted, settings, workers=1, shard_size=2, progress=False, part=Part(2, 3))
    assert again.written == 0 and again.skipped_existing == reports[1]["written"]
    for bad in ("4/3", "0/3", "2", "a/b"):
        with pytest.raises(ValueError, match="--part"):
            Part.parse(bad)


def test_a_shard_is_never_written_over(tmp_path):
    from vfusion3d_lightning.data.schema import ShardWriter

    writer = ShardWriter(tmp_path, maxcount=1, part=Part(1, 2))  # shard-000000, then -000002
    writer.write({"__key__": "a", "txt": b"a"})
    (tmp_path / "shard-000002.tar").write_bytes(b"someone else's")  # another run's, under the next number
    writer.write({"__key__": "b", "txt": b"b"})
    with pytest.raises(FileExistsError, match="shard-000002.tar exists: another run is writing shards"):
        writer.close()
    assert (tmp_path / "shard-000002.tar").read_bytes() == b"someone else's"


def test_held_out_split_renders_each_asset_on_one_side_by_its_name(tmp_path, capsys):
    from vfusion3d_lightning.data.schema import is_held_out

    assets, out = tmp_path / "assets", tmp_path / "yours"
    write_assets(assets, 10, seed=4, formats=("ply",))
    keys = [sample_key(path) for path in find_assets(assets)]
    held = {key for key in keys if is_held_out(key, 0.3)}
    assert 0 < len(held) < len(keys)
    args = ["render", "--assets", str(assets), "--out", str(out), "--views", "random32", "--resolution", "16",
            "--workers", "1", "--shard_size", "4", "--held_out", "0.3", "--progress", "false"]
    assert main(args) == 0
    train = {key for keys_ in keys_in_shards(complete_shards(out / "train")).values() for key in keys_}
    held_out = {key for keys_ in keys_in_shards(complete_shards(out / "held_out")).values() for key in keys_}
    assert held_out == held and train == set(keys) - held
    # each side its own views: random32 for training, the evaluation's uniform32 for the held-out objects
    views = {s.extra["views"] for s in read_samples(complete_shards(out / "held_out"))}
    assert views == {"uniform32"}
    assert {s.extra["views"] for s in read_samples(complete_shards(out / "train"))} == {"random32"}
    # a side depends on the asset's name alone: more assets move none of the old ones
    write_assets(assets / "more", 6, seed=9, formats=("ply",), prefix="more")
    assert main(args) == 0
    grown = {key for keys_ in keys_in_shards(complete_shards(out / "held_out")).values() for key in keys_}
    assert held <= grown and not grown & train
    assert "already present" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--held_out 1.5: the fraction of assets to hold out must be in"):
        main([*args[:-4], "--held_out", "1.5"])
    with pytest.raises(ValueError, match="holds out none of the 16 assets.*raise it"):
        main([*args[:-4], "--held_out", "0.0001"])
