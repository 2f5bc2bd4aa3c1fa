"""Curation on procedural orbits: DINO-style features (random tiny ViT), the quality SVM on good videos and
videos spoiled the ways generated ones go wrong, and the elevation MLP on renders with known elevation."""

import json
import math
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from vfusion3d_lightning.data.curation import CurationDataModule
from vfusion3d_lightning.data.feature_cache import read_features, shard_paths
from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter, complete_shards
from vfusion3d_lightning.data.schema import read_samples as read_shard_samples
from vfusion3d_lightning.data.spoil import SPOIL_KINDS, spoil_video
from vfusion3d_lightning.models.curation.features import curation_indices, uniform_indices
from vfusion3d_lightning.models.curation.quality import QualitySVM
from vfusion3d_lightning.training import ElevationModule, FeatureExtractor, QualityModule
from vfusion3d_lightning.training.features import compute_features

# a random ViT's class token alone carries little; with the patch mean its features separate the spoiled videos
TINY_DINO = dict(model_name="vit_small_patch16_224", random_init=True, image_size=64, pooling="cls+mean",
                 overrides=dict(patch_size=8, embed_dim=384, depth=4, num_heads=6))
DIM = 768


def tiny_extractor(**kwargs) -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor(**{**TINY_DINO, **kwargs})


def read_samples(folder) -> list[MultiViewSample]:
    return list(read_shard_samples(complete_shards(folder)))


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory, procedural_shards):
    """48 good orbits and 48 spoiled ones (12 of each kind) in shards, with a labels file."""
    root = tmp_path_factory.mktemp("quality")
    pattern = procedural_shards(root / "renders", 48, seed=3, views="orbit16", resolution=48)
    good = read_samples(shard_paths(pattern)[0].parent)
    rng = np.random.default_rng(0)
    labels = root / "labels.jsonl"
    with ShardWriter(root / "videos", maxcount=8) as writer, open(labels, "w") as handle:
        for i, sample in enumerate(good):
            other = good[(i + 1) % len(good)].images
            bad = spoil_video(sample.images, other, SPOIL_KINDS[i % 4], rng)
            for key, images, label in ((f"good{i:02d}", sample.images, 1), (f"bad{i:02d}", bad, 0)):
                writer.write_sample(MultiViewSample(key=key, object_id=sample.object_id, source="synthetic",
                                                    images=images, prompt="an object"))
                handle.write(json.dumps({"key": key, "label": label}) + "\n")
    extractor = tiny_extractor()
    compute_features(root / "videos", extractor, accelerator="cpu", devices=1, num_workers=0, progress=False)
    return root, extractor.tag


def test_uniform_frames_of_an_orbit():
    assert uniform_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert uniform_indices(16, 4) == [0, 4, 8, 12]
    frames, quality, elevation = curation_indices(16)
    assert [frames[i] for i in quality] == uniform_indices(16, 8)
    assert [frames[i] for i in elevation] == uniform_indices(16, 4)
    with pytest.raises(ValueError, match="cannot pick 17"):
        uniform_indices(16, 17)


def test_dino_needs_weights_unless_random_is_asked():
    from vfusion3d_lightning.models.curation.features import DinoFeatures

    with pytest.raises(FileNotFoundError, match=r"not found: fetch https://huggingface\.co/timm/vit_base_patch16_224"
                                                r"\.dino \(file model\.safetensors\) and save it as .*dino-vitb16/"
                                                r"model\.safetensors; then pass weights='dino-vitb16'"):
        DinoFeatures()
    with pytest.raises(FileNotFoundError, match="/nonexistent/dino.safetensors not found: fetch https://huggingface"):
        DinoFeatures(weights="/nonexistent/dino.safetensors", image_size=64)


def test_features_are_cached_per_shard_and_match_a_direct_encoding(quality_data):
    root, tag = quality_data
    table = read_features(root / "videos", tag)
    assert len(table.keys) == 96 and table.quality.shape == (96, DIM) and table.elevation.shape == (96, DIM)
    extractor = tiny_extractor()
    first = read_samples(root / "videos")[0]
    frames = torch.from_numpy(first.images[extractor.frames])[None]
    quality, elevation = extractor.encode(frames)
    row = table.keys.index(first.key)
    torch.testing.assert_close(quality[0], table.quality[row], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(elevation[0], table.elevation[row], atol=1e-4, rtol=1e-4)


def test_features_with_loader_workers_read_every_shard(quality_data, tmp_path):
    # each worker reads whole shards of its own: a shard reader that splits its list over workers gave some nothing
    root, tag = quality_data
    videos = tmp_path / "videos"
    videos.mkdir()
    for shard in complete_shards(root / "videos"):
        shutil.copy(shard, videos / shard.name)
    compute_features(videos, tiny_extractor(), accelerator="cpu", devices=1, num_workers=2, progress=False)
    with_workers, in_process = read_features(videos, tag), read_features(root / "videos", tag)
    assert len(complete_shards(videos)) > 2 and with_workers.keys == in_process.keys
    torch.testing.assert_close(with_workers.quality, in_process.quality)


def test_features_command_reruns_on_the_same_folder(quality_data, tmp_path):
    # the README's features command, twice: the rerun skips cached shards; LightningCLI had refused to
    # overwrite the config.yaml the first run saved
    from vfusion3d_lightning.cli import main

    root, tag = quality_data
    videos = tmp_path / "videos"
    videos.mkdir()
    for shard in complete_shards(root / "videos")[:2]:
        shutil.copy(shard, videos / shard.name)
    overrides = ",".join(f"{key}: {value}" for key, value in TINY_DINO["overrides"].items())
    argv = ["predict", "--config", str(Path(__file__).parents[2] / "configs/curation/features.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.shards", str(videos),
            "--data.init_args.num_workers", "0", "--model.init_args.weights", "null",
            "--model.init_args.random_init", "true", "--model.init_args.model_name", TINY_DINO["model_name"],
            "--model.init_args.image_size", str(TINY_DINO["image_size"]),
            "--model.init_args.pooling", TINY_DINO["pooling"], "--model.init_args.overrides", f"{{{overrides}}}"]
    for _ in range(2):
        assert main(argv) == 0
    assert len(read_features(videos, tag).keys) == 16 and (tmp_path / "run" / "config.yaml").exists()


def test_validation_split_does_not_depend_on_which_shard_holds_a_video(quality_data, tmp_path):
    # render workers finish in any order, so the same videos can land in other shards on a rerun
    from vfusion3d_lightning.data.curation import CurationDataModule
    from vfusion3d_lightning.data.feature_cache import cache_path

    root, tag = quality_data
    shards = complete_shards(root / "videos")
    shuffled = tmp_path / "videos"
    shuffled.mkdir()
    for shard, name in zip(shards, reversed([s.name for s in shards])):
        shutil.copy(shard, shuffled / name)
        shutil.copy(cache_path(shard, tag), cache_path(shuffled / name, tag))
    assert read_features(shuffled, tag).keys != read_features(root / "videos", tag).keys
    splits = []
    for folder in (root / "videos", shuffled):
        data = CurationDataModule(str(folder), tag, "quality", labels=str(root / "labels.jsonl"))
        data.setup()
        splits.append(data.val_set.tensors)
    torch.testing.assert_close(splits[0], splits[1], rtol=0, atol=0)


def test_unreadable_shards_are_named(quality_data, tmp_path):
    from vfusion3d_lightning.data.schema import SampleError
    from vfusion3d_lightning.training.features import ShardFrames

    root, _ = quality_data
    source = complete_shards(root / "videos")[0]
    frames = curation_indices(16)[0]
    garbage = tmp_path / "shard-000001.tar"
    garbage.write_bytes(b"not a tar file " * 100)
    with pytest.raises(SampleError, match=f"shard {garbage} cannot be read.*write it again"):
        ShardFrames([garbage], frames)[0]
    truncated = tmp_path / source.name  # cut: named as cut before any sample is read
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    with pytest.raises(SampleError, match=f"shard {truncated} cannot be read .*the file was cut"):
        ShardFrames([truncated], frames)[0]


def test_quality_svm_separates_spoiled_videos(quality_data, tmp_path):
    root, tag = quality_data
    datamodule = CurationDataModule(str(root / "videos"), tag, target="quality", labels=str(root / "labels.jsonl"),
                                    val_fraction=0.25, seed=0)
    module = QualityModule(folds=3, export_path=str(tmp_path / "quality_svm"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    print(f"held-out quality metrics: {module.metrics}")
    assert module.metrics["count"] == 24
    assert module.metrics["accuracy"] >= 0.7  # chance is 0.5 on this balanced split
    loaded = QualitySVM.from_pretrained(tmp_path / "quality_svm")
    features, labels = datamodule.val_set.tensors
    np.testing.assert_allclose(loaded.score(features.numpy()), module.svm.score(features.numpy()))
    assert loaded.info["held_out"]["accuracy"] == module.metrics["accuracy"]


def test_quality_svm_refuses_foreign_files(tmp_path):
    import skops.io

    rng = np.random.default_rng(0)
    svm = QualitySVM(c_values=(1.0,), folds=2).fit(rng.normal(size=(8, 4)), np.array([0, 1] * 4))
    with pytest.raises(ValueError, match="takes features \\(N, 4\\)"):
        svm.score(np.zeros((2, 5)))
    skops.io.dump({"info": {"format": "something else"}}, tmp_path / "other.skops")
    with pytest.raises(ValueError, match="is not a quality SVM"):
        QualitySVM.from_pretrained(tmp_path / "other.skops")
    with pytest.raises(FileNotFoundError, match="configs/curation/quality.yaml"):
        QualitySVM.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no model.skops"):
        QualitySVM.from_pretrained(tmp_path / "empty")


def test_elevation_mlp_beats_the_mean_on_held_out_objects(tmp_path, procedural_shards):
    # upright assets, as real ones are modelled, so elevation shows in the views. Features come from a random
    # CNN, whose pooled edge statistics keep the flattening of the base's outline; a random ViT's pooled
    # tokens do not (their held-out error stayed at the constant mean's).
    train = procedural_shards(tmp_path / "train", 160, seed=11, views="orbit16", resolution=64, style="upright",
                              shard_size=16)
    held_out = procedural_shards(tmp_path / "val", 48, seed=5000, views="orbit16", resolution=64, style="upright",
                                 shard_size=16)
    torch.manual_seed(0)
    extractor = FeatureExtractor(model_name="resnet10t", random_init=True, image_size=64, pooling="mean")
    for pattern in (train, held_out):
        compute_features(shard_paths(pattern)[0].parent, extractor, accelerator="cpu", devices=1, num_workers=0,
                         progress=False)
    datamodule = CurationDataModule(train, extractor.tag, target="elevation", val_shards=held_out, batch_size=16)
    targets = datamodule.training_targets()
    assert len(targets) == 160 and 0 <= targets.min() and targets.max() <= math.pi / 4
    torch.manual_seed(0)
    module = ElevationModule(feature_dim=512, hidden_dim=512, lr=1e-3, weight_decay=0.1,
                             export_path=str(tmp_path / "elevation_mlp"))
    features, elevation = datamodule.train_set.tensors
    module.model.set_normalization(features)
    before = torch.nn.functional.l1_loss(module(features), elevation).item()
    trainer = L.Trainer(accelerator="cpu", max_epochs=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    module.eval()
    after = torch.nn.functional.l1_loss(module(features), elevation).item()
    assert after < 0.5 * before
    assert module.baseline.item() == pytest.approx(targets.mean().item(), abs=1e-6)
    error, baseline = (trainer.callback_metrics[k].item() for k in ("val/mae_deg", "val/baseline_mae_deg"))
    print(f"held-out elevation MAE {error:.2f} deg, constant-mean baseline {baseline:.2f} deg")
    assert error < 0.85 * baseline
    from vfusion3d_lightning.models.curation.elevation import ElevationMLP

    exported = ElevationMLP.from_pretrained(tmp_path / "elevation_mlp")  # what `label` reads
    assert exported.config["feature_tag"] == extractor.tag
    torch.testing.assert_close(exported(features), module(features))
    with pytest.raises(ValueError, match="set model.init_args.feature_dim 512"):
        L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False).fit(ElevationModule(feature_dim=10), datamodule=datamodule)


def test_filter_then_label_keeps_the_schema_and_resumes(quality_data, tmp_path, capsys):
    import os

    from vfusion3d_lightning.cli import main
    from vfusion3d_lightning.data.curate_shards import FILTER_REPORT
    from vfusion3d_lightning.data.labels import read_labels
    from vfusion3d_lightning.models.curation.elevation import ElevationMLP

    root, tag = quality_data
    table, labels = read_features(root / "videos", tag), read_labels(root / "labels.jsonl")
    svm = QualitySVM(folds=3).fit(table.quality.numpy(), np.array([labels[k] for k in table.keys]), tag)
    svm.save_pretrained(tmp_path / "quality_svm")
    kept_dir, labelled_dir = tmp_path / "kept", tmp_path / "labelled"
    filter_args = ["filter", "--shards", str(root / "videos"), "--svm", str(tmp_path / "quality_svm"), "--out",
                   str(kept_dir)]
    assert main(filter_args) == 0
    report = json.loads((kept_dir / FILTER_REPORT).read_text())
    expected = {k for k, s in zip(table.keys, svm.score(table.quality.numpy())) if s >= 0.5}
    assert report["totals"] == {"videos": 96, "kept": len(expected), "dropped": 96 - len(expected)}
    kept = read_samples(kept_dir)
    assert {s.key for s in kept} == expected and 30 < len(expected) < 80
    assert all(s.quality >= 0.5 for s in kept)
    assert np.mean([labels[s.key] for s in kept]) > 0.8  # mostly good videos survive
    assert read_features(kept_dir, tag).keys == [s.key for s in kept]  # features travel with the videos

    # a kill after some shards: the rerun writes only what is missing
    outputs = complete_shards(kept_dir)
    lost = outputs[-1]
    lost.unlink()
    del report["shards"][lost.name]
    (kept_dir / FILTER_REPORT).write_text(json.dumps(report))
    before = {p: p.stat().st_mtime_ns for p in outputs[:-1]}
    assert main(filter_args) == 0
    assert lost.is_file() and all(p.stat().st_mtime_ns == t for p, t in before.items())
    with pytest.raises(ValueError, match="other settings \\(threshold"):
        main(filter_args + ["--threshold", "0.7"])

    torch.manual_seed(0)
    mlp = ElevationMLP(DIM, hidden_dim=16, feature_tag=tag)
    mlp.set_normalization(table.elevation)
    mlp.save_pretrained(tmp_path / "elevation_mlp")
    assert main(["label", "--shards", str(kept_dir), "--out", str(labelled_dir), "--elevation",
                 str(tmp_path / "elevation_mlp")]) == 0
    assert "labelled" in capsys.readouterr().out
    originals = {s.key: s for s in read_samples(root / "videos")}
    predicted = dict(zip(read_features(kept_dir, tag).keys,
                         ElevationMLP.from_pretrained(tmp_path / "elevation_mlp")(
                             read_features(kept_dir, tag).elevation).tolist()))
    labelled = list(read_shard_samples(complete_shards(labelled_dir), require_cameras=True))
    assert [s.key for s in labelled] == [s.key for s in kept]
    overlaps = []
    for sample in labelled:
        np.testing.assert_allclose(sample.elevations, predicted[sample.key], atol=1e-5)
        heights = sample.cam2world[:, 2, 3] / np.linalg.norm(sample.cam2world[:, :3, 3], axis=1)
        np.testing.assert_allclose(heights, np.sin(predicted[sample.key]), atol=1e-4)
        assert sample.quality == pytest.approx(next(s.quality for s in kept if s.key == sample.key))
        assert sample.extra["mask_method"] == "threshold"
        if sample.key.startswith("good"):  # rendered on white: the threshold mask finds the true silhouette
            truth, mask = originals[sample.key].images[..., 3] > 127, sample.images[..., 3] > 127
            overlaps.append((truth & mask).sum() / (truth | mask).sum())
    assert np.mean(overlaps) > 0.9  # at 48 pixels, anti-aliased edges are a good part of each silhouette
    # the labelled videos are LRM training data: cameras and masks as the LRM's DataModule reads them
    from vfusion3d_lightning.data.datamodules import MultiViewDataModule

    lrm_data = MultiViewDataModule(str(labelled_dir / "shard-*.tar"), batch_size=2, num_workers=0,
                                   num_supervision_views=4, input_size=32, supervision_size=16, on_error="raise")
    lrm_data.setup("fit")
    batch = next(iter(lrm_data.train_dataloader()))
    assert batch["render_cameras"].shape == (2, 4, 25) and torch.isfinite(batch["render_cameras"]).all()
    assert 0 < batch["target_masks"].mean() < 1
    mtimes = {p: p.stat().st_mtime_ns for p in complete_shards(labelled_dir)}
    assert main(["label", "--shards", str(kept_dir), "--out", str(labelled_dir), "--elevation",
                 str(tmp_path / "elevation_mlp")]) == 0
    assert {p: p.stat().st_mtime_ns for p in complete_shards(labelled_dir)} == mtimes
    assert not list(labelled_dir.glob("*.partial")) and not os.listdir(tmp_path / "kept") == []


def test_elevation_mlp_folder_round_trip_and_errors(tmp_path):
    from vfusion3d_lightning.models.curation.elevation import ElevationMLP

    torch.manual_seed(0)
    mlp = ElevationMLP(12, hidden_dim=8, feature_tag="some-tag")
    mlp.set_normalization(torch.randn(20, 12) * 3 + 1)
    mlp.save_pretrained(tmp_path / "mlp")
    loaded = ElevationMLP.from_pretrained(tmp_path / "mlp")
    features = torch.randn(5, 12)
    torch.testing.assert_close(loaded(features), mlp.eval()(features))
    assert loaded.config["feature_tag"] == "some-tag"
    with pytest.raises(FileNotFoundError, match="configs/curation/elevation.yaml"):
        ElevationMLP.from_pretrained(tmp_path / "missing")
    (tmp_path / "mlp" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not an elevation MLP config"):
        ElevationMLP.from_pretrained(tmp_path / "mlp")
