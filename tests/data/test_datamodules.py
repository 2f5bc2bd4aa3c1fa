import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vfusion3d_lightning.cameras import canonical_source_camera, canonical_source_pose, split_render_camera
from vfusion3d_lightning.data.datamodules import (
    LRMViews,
    MultiViewDataModule,
    OrbitClip,
    ShardStream,
    VideoDataModule,
    expand_shards,
)
from vfusion3d_lightning.data.schema import SampleError, ShardWriter, decode_sample, encode_sample


def test_multiview_batches_have_the_lrm_layout(tmp_path, shard_factory):
    shard_factory(tmp_path, n_shards=2, per_shard=3)
    dm = MultiViewDataModule(str(tmp_path / "shard-{000000..000001}.tar"), batch_size=2, num_workers=0,
                             num_supervision_views=4, input_size=28, supervision_size=16)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # 6 samples, batch 2
    batch = batches[0]
    assert batch["input_image"].shape == (2, 3, 28, 28)
    assert batch["target_images"].shape == (2, 4, 3, 16, 16) and batch["target_masks"].shape == (2, 4, 1, 16, 16)
    assert batch["render_cameras"].shape == (2, 4, 25) and len(batch["object_id"]) == 2
    assert torch.allclose(batch["source_camera"], canonical_source_camera(2))  # fx/W = 0.75, cx/W = 0.5
    # the input view is the first supervision view; it sits at the canonical pose, 1.5 from the object
    pose, k = split_render_camera(batch["render_cameras"])
    assert torch.allclose(pose[:, 0, :3, :3], canonical_source_pose()[:3, :3].expand(2, 3, 3), atol=1e-5)
    assert torch.allclose(pose[:, 0, :3, 3], torch.tensor([1.5, 0.0, 0.0]).expand(2, 3), atol=1e-5)
    assert torch.allclose(pose[..., :3, 3].norm(dim=-1), torch.full((2, 4), 1.5), atol=1e-5)
    assert torch.allclose(k[..., 0, 0], torch.full((2, 4), 0.75))
    # composited on white outside the mask; the object's colour inside
    images, masks = batch["target_images"], batch["target_masks"]
    assert images.min() >= 0 and images.max() <= 1 and set(masks.unique().tolist()) >= {0.0, 1.0}
    assert torch.allclose(images[..., 0, 0], torch.ones(2, 4, 3))
    centre = images[..., 8, 8]
    assert torch.allclose(centre[..., 1], torch.full((2, 4), 100 / 255), atol=1e-3)


def test_input_view_red_channel_matches_its_render_camera(tmp_path, sample_factory):
    # view i has red = 7 i: the chosen input view and its camera must agree
    views = LRMViews(num_supervision_views=3, include_input_view=False, input_size=24, supervision_size=24)
    sample = sample_factory("obj", n_views=8)
    rng = np.random.default_rng(0)
    out = views(decode_sample(encode_sample(sample), select=lambda n: views.select(n, rng)), rng)
    input_index = round(out["input_image"][0, 12, 12].item() * 255 / 7)
    target_indices = [round(v * 255 / 7) for v in out["target_images"][:, 0, 12, 12].tolist()]
    assert input_index not in target_indices and len(set(target_indices)) == 3
    pose, _ = split_render_camera(out["render_cameras"])
    original = torch.from_numpy(sample.cam2world)
    relative = torch.linalg.inv(original[input_index]) @ original[target_indices]
    canonical_input = torch.eye(4)
    canonical_input[:3, :3] = canonical_source_pose()[:3, :3]
    canonical_input[:3, 3] = torch.tensor([1.5, 0.0, 0.0])
    assert torch.allclose(torch.linalg.inv(canonical_input) @ pose, relative, atol=1e-5)


def test_video_clips_keep_orbit_order(tmp_path, shard_factory, sample_factory):
    shard_factory(tmp_path, n_shards=1, per_shard=2, n_views=32)
    dm = VideoDataModule(str(tmp_path / "shard-000000.tar"), batch_size=2, num_workers=0, num_frames=16,
                         frame_size=20)
    (batch,) = list(dm.train_dataloader())
    assert batch["frames"].shape == (2, 16, 3, 20, 20)
    assert batch["prompt"] == ["a red cube", "a red cube"]
    assert torch.allclose(batch["elevation"].float(), torch.full((2,), 0.3))
    red = (batch["frames"][0, :, 0, 10, 10] * 255 / 7).round().long().tolist()
    assert red == list(range(0, 32, 2))  # every other view of the 32, in order
    clip = OrbitClip(16, 8)
    with pytest.raises(SampleError, match="'short': has 8 views; clips need 16"):
        decode_sample(encode_sample(sample_factory("short", n_views=8)), select=lambda n: clip.select(n, None))


def collect_ids(dataset: ShardStream, workers: int) -> list[str]:
    loader = DataLoader(dataset, batch_size=1, num_workers=workers)
    return [batch["object_id"][0] for batch in loader]


def test_a_folder_names_its_complete_shards(tmp_path, shard_factory):
    shard_factory(tmp_path, n_shards=3, per_shard=2)
    (tmp_path / "shard-000003.tar.partial").write_bytes(b"cut short")  # a killed writer's: not a shard yet
    assert expand_shards(str(tmp_path)) == expand_shards(str(tmp_path / "shard-*.tar"))
    assert len(expand_shards(str(tmp_path))) == 3
    dm = MultiViewDataModule(str(tmp_path), batch_size=2, num_workers=0, num_supervision_views=4, input_size=28,
                             supervision_size=16)
    assert len(list(dm.train_dataloader())) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards in the folder .*empty"):
        expand_shards(str(tmp_path / "empty"))


def test_a_folder_gives_every_tar_in_it_sorted_but_not_partial_or_hidden_files(tmp_path, shard_factory):
    import shutil

    shard_factory(tmp_path / "made", n_shards=2, per_shard=2)
    folder = tmp_path / "given"
    folder.mkdir()
    for source, name in (("shard-000000.tar", "objaverse_b.tar"), ("shard-000001.tar", "objaverse_a.tar"),
                         ("shard-000001.tar", ".hidden.tar"), ("shard-000001.tar", "late.tar.partial")):
        shutil.copy(tmp_path / "made" / source, folder / name)
    (folder / "notes.txt").write_text("not a shard")
    (folder / "sub.tar").mkdir()  # a folder, not a shard
    assert expand_shards(str(folder)) == [str(folder / "objaverse_a.tar"), str(folder / "objaverse_b.tar")]
    dm = MultiViewDataModule(str(folder), batch_size=1, num_workers=0, num_supervision_views=4, input_size=28,
                             supervision_size=16, shuffle_buffer=1)
    assert sorted(b["object_id"][0] for b in dm.train_dataloader()) == [f"object-obj{i:04d}" for i in range(4)]


def test_every_sample_skipped_is_one_line_naming_the_shards_count_and_reason(tmp_path, shard_factory):
    shard_factory(tmp_path, n_shards=2, per_shard=2, n_views=4, with_cameras=False)  # generated videos: no cameras
    dm = MultiViewDataModule(str(tmp_path), batch_size=1, num_workers=0, num_supervision_views=2, input_size=8,
                             supervision_size=8, samples_per_epoch=2)
    with pytest.raises(SampleError) as caught:
        list(dm.train_dataloader())
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("no usable sample: all 4 sample(s) of 2 shard(s) ")
    assert str(tmp_path / "shard-000000.tar") in message and str(tmp_path / "shard-000001.tar") in message
    assert "4 of them because has no cameras (cam2world/intrinsics null)" in message
    assert "the LRM needs cam2world and intrinsics in every sample" in message
    # the video model needs no cameras: the same shards train it
    assert len(list(VideoDataModule(str(tmp_path), batch_size=1, num_workers=0, num_frames=4, frame_size=8,
                                    samples_per_epoch=2).train_dataloader())) == 2


def test_every_sample_skipped_in_a_loader_worker_is_one_line_on_the_command_line(tmp_path, shard_factory,
                                                                                 monkeypatch, capsys):
    from vfusion3d_lightning.cli import console_main

    shard_factory(tmp_path / "videos", n_shards=2, per_shard=2, n_views=4, with_cameras=False)
    monkeypatch.setattr("sys.argv", [
        "vfusion3d-lightning", "fit", "--config", str(Path(__file__).parents[2] / "configs" / "lrm" / "tiny.yaml"),
        "--data.init_args.train_shards",
        str(tmp_path / "videos"), "--data.init_args.val_shards", "null", "--data.init_args.num_workers", "2",
        "--data.init_args.samples_per_epoch", "4", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    monkeypatch.delenv("VFUSION3D_TRACEBACK", raising=False)
    assert console_main() == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vfusion3d-lightning: error: no usable sample: all ")
    assert "because has no cameras" in error and "the LRM needs cam2world and intrinsics" in error


def test_two_ranks_by_two_workers_read_disjoint_samples_covering_the_split(tmp_path, shard_factory):
    keys = shard_factory(tmp_path, n_shards=8, per_shard=3, n_views=4)
    urls = expand_shards(str(tmp_path / "shard-*.tar"))
    seen = []
    for rank in range(2):
        stream = ShardStream(urls, LRMViews(2, True, 8, 8), samples_per_rank=12, rank=rank, world_size=2,
                             shuffle=True, shuffle_buffer=4, seed=3, require_cameras=True)
        ids = collect_ids(stream, workers=2)
        assert len(ids) == 12 and len(set(ids)) == 12
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"object-{k}" for k in keys}


def test_uneven_shards_still_give_every_rank_the_same_number_of_batches(tmp_path, sample_factory, monkeypatch):
    with ShardWriter(tmp_path, maxcount=100) as writer:
        for shard_size in (1, 2, 5, 1, 3):
            for i in range(shard_size):
                writer.write_sample(sample_factory(f"s{writer.shard}x{i}", n_views=4))
            writer.next_stream()
    dm = MultiViewDataModule(str(tmp_path / "shard-*.tar"), batch_size=2, num_workers=2, num_supervision_views=2,
                             input_size=8, supervision_size=8)
    counts = []
    for rank in range(2):
        monkeypatch.setattr(dm, "_rank_and_size", lambda rank=rank: (rank, 2))
        counts.append(sum(1 for _ in dm.train_dataloader()))
    # 12 samples / 2 ranks = 6 per rank, 3 per worker: one full batch of 2 per worker, whatever the shard sizes
    assert counts == [2, 2]


def test_epochs_shuffle_differently_and_reproducibly(tmp_path, shard_factory):
    shard_factory(tmp_path, n_shards=4, per_shard=4, n_views=4)
    urls = expand_shards(str(tmp_path / "shard-*.tar"))

    def order(epoch):
        stream = ShardStream(urls, LRMViews(2, True, 8, 8), samples_per_rank=16, shuffle=True, shuffle_buffer=8)
        stream.epoch = epoch
        return collect_ids(stream, workers=0)

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))


def test_bad_samples_are_skipped_and_counted_or_raised(tmp_path, sample_factory, caplog):
    with ShardWriter(tmp_path, maxcount=10) as writer:
        broken = encode_sample(sample_factory("broken", n_views=4))
        for view in range(4):  # truncate every view: training decodes only the views it picks
            broken[f"{view:03d}.png"] = broken[f"{view:03d}.png"][:30]
        writer.write(broken)
        writer.write_sample(sample_factory("nocam", n_views=4, with_cameras=False))
        for i in range(4):
            writer.write_sample(sample_factory(f"ok{i}", n_views=4))
    pattern = str(tmp_path / "shard-000000.tar")
    dm = MultiViewDataModule(pattern, batch_size=1, num_workers=0, num_supervision_views=2, input_size=8,
                             supervision_size=8, samples_per_epoch=4, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        ids = [b["object_id"][0] for b in dm.train_dataloader()]
    assert sorted(ids) == [f"object-ok{i}" for i in range(4)]
    warnings = caplog.text
    assert "'broken'" in warnings and ".png cannot be decoded" in warnings
    assert "'nocam'" in warnings and "has no cameras" in warnings
    assert "skipped 2 bad sample(s)" in warnings
    strict = MultiViewDataModule(pattern, batch_size=1, num_workers=0, num_supervision_views=2, input_size=8,
                                 supervision_size=8, samples_per_epoch=6, on_error="raise")
    with pytest.raises(SampleError, match="broken"):
        list(strict.train_dataloader())


def test_clear_errors_for_bad_configuration(tmp_path, shard_factory):
    with pytest.raises(FileNotFoundError, match="no shards match"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        expand_shards(str(tmp_path / "shard-{000000..000001}.tar"))
    shard_factory(tmp_path, n_shards=1, per_shard=2, n_views=4)
    dm = MultiViewDataModule(str(tmp_path / "shard-000000.tar"), batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="cannot fill a batch of 4"):
        dm.train_dataloader()
    # a validation set too small for every worker gets fewer workers, not an error
    small = MultiViewDataModule(str(tmp_path / "shard-000000.tar"), batch_size=1, num_workers=4)
    assert small.train_dataloader().num_workers == 1 and len(small.train_dataloader()) == 2
    stream = ShardStream([str(tmp_path / "shard-000000.tar")], LRMViews(2, True, 8, 8), samples_per_rank=2,
                         rank=0, world_size=2)
    with pytest.raises(ValueError, match="1 shards cannot feed 2 rank"):
        next(iter(stream))


def _view_indices(batch: dict) -> set[int]:
    """The views a batch holds, from the red channel (7 x the view index) at the centre, inside the object."""
    red = torch.cat([batch["input_image"][:, None, 0], batch["target_images"][:, :, 0]], dim=1)[..., 4, 4]  # centre
    return set((red * 255 / 7).round().long().flatten().tolist())


def test_views_per_object_trains_on_a_fixed_strided_subset_and_validates_on_every_view(tmp_path, shard_factory,
                                                                                       sample_factory):
    from vfusion3d_lightning.data.datamodules import object_views

    assert object_views(32, 16) == list(range(0, 32, 2)) and object_views(32, None) == list(range(32))
    assert object_views(32, 32) == list(range(32)) and object_views(24, 8) == list(range(0, 24, 3))
    shard_factory(tmp_path, n_shards=1, per_shard=4, n_views=32, size=8)
    pattern = str(tmp_path / "shard-000000.tar")

    def seen(views_per_object, train=True):
        dm = MultiViewDataModule(pattern, val_shards=pattern, batch_size=2, num_workers=0, num_supervision_views=4,
                                 input_size=8, supervision_size=8, views_per_object=views_per_object)
        views = set()
        for epoch in range(12):  # each pass draws other views
            loader = dm.train_dataloader() if train else dm.val_dataloader()
            loader.progress = lambda epoch=epoch: (epoch, 0)
            for batch in loader:
                views |= _view_indices(batch)
        return views

    assert seen(16) == set(range(0, 32, 2))  # every even view, and no other
    assert seen(32) == seen(None) == set(range(32))
    assert len(seen(16, train=False) - set(range(0, 32, 2))) > 0  # validation: every view, odd ones too
    with pytest.raises(ValueError, match="views_per_object 3 leaves too few views for one input and 4 supervision"):
        MultiViewDataModule(pattern, num_supervision_views=4, views_per_object=3)
    views = LRMViews(4, True, 8, 8, views_per_object=16)
    with pytest.raises(SampleError, match="'few': has 8 views, fewer than views_per_object 16"):
        decode_sample(encode_sample(sample_factory("few", n_views=8, size=8)),
                      select=lambda n: views.select(n, np.random.default_rng(0)))
