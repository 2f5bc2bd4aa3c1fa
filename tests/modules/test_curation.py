"""Curation on procedural orbits: DINO-style features (random tiny ViT), the quality SVM on good videos and
videos spoiled the ways generated ones go wrong, and the elevation MLP on renders with known elevation."""

import json
import math

import lightning as L
import numpy as np
import pytest
import torch

from vfusion3d_lightning.data.curation import CurationDataModule
from vfusion3d_lightning.data.feature_cache import read_features, shard_paths
from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter, complete_shards, decode_sample
from vfusion3d_lightning.models.features import curation_indices, uniform_indices
from vfusion3d_lightning.models.quality import QualitySVM
from vfusion3d_lightning.modules import ElevationModule, FeatureExtractor, QualityModule
from vfusion3d_lightning.modules.features import compute_features

import webdataset as wds

# a random ViT's class token alone carries little; with the patch mean its features separate the spoiled videos
TINY_DINO = dict(model_name="vit_small_patch16_224", random_init=True, image_size=64, pooling="cls+mean",
                 overrides=dict(patch_size=8, embed_dim=384, depth=4, num_heads=6))
DIM = 768


def tiny_extractor(**kwargs) -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor(**{**TINY_DINO, **kwargs})


def read_samples(folder) -> list[MultiViewSample]:
    return [decode_sample(raw) for raw in wds.WebDataset([str(p) for p in complete_shards(folder)],
                                                         shardshuffle=False)]


def spoil(images: np.ndarray, other: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A bad video from a good one (N, H, W, 4) uint8, the ways generated orbits fail."""
    out = images.copy()
    n, size = images.shape[0], images.shape[1]
    if kind == "switch":  # another object from the middle on
        out[n // 2:] = other[n // 2:]
    elif kind == "blur":
        from PIL import Image, ImageFilter

        for i in range(n):
            out[i] = np.asarray(Image.fromarray(out[i], "RGBA").filter(ImageFilter.GaussianBlur(size / 10)))
    elif kind == "noise":
        rgb = out[..., :3].astype(np.float32) + rng.normal(0, 60, out[..., :3].shape)
        out[..., :3] = np.clip(rgb, 0, 255).astype(np.uint8)
        out[..., 3] = 255
    else:  # coloured blotches on the background
        for i in range(n):
            for _ in range(3):
                y, x = rng.integers(0, size - size // 4, 2)
                out[i, y:y + size // 4, x:x + size // 4] = [*rng.integers(0, 255, 3), 255]
    return out


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory, procedural_shards):
    """48 good orbits and 48 spoiled ones (12 of each kind) in shards, with a labels file."""
    root = tmp_path_factory.mktemp("quality")
    pattern = procedural_shards(root / "renders", 48, seed=3, views="orbit16", resolution=48)
    good = read_samples(shard_paths(pattern)[0].parent)
    rng = np.random.default_rng(0)
    kinds = ["switch", "blur", "noise", "blotches"]
    labels = root / "labels.jsonl"
    with ShardWriter(root / "videos", maxcount=8) as writer, open(labels, "w") as handle:
        for i, sample in enumerate(good):
            other = good[(i + 1) % len(good)].images
            bad = spoil(sample.images, other, kinds[i % 4], rng)
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
    from vfusion3d_lightning.models.features import DinoFeatures

    with pytest.raises(ValueError, match="checkpoints/dino-vitb16/model.safetensors"):
        DinoFeatures()
    with pytest.raises(FileNotFoundError, match="does not exist"):
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


def test_unreadable_shards_are_named(quality_data, tmp_path):
    from vfusion3d_lightning.data.schema import SampleError
    from vfusion3d_lightning.modules.features import ShardFrames

    root, _ = quality_data
    source = complete_shards(root / "videos")[0]
    frames = curation_indices(16)[0]
    garbage = tmp_path / "shard-000001.tar"
    garbage.write_bytes(b"not a tar file " * 100)
    with pytest.raises(SampleError, match=f"shard {garbage} cannot be read.*write it again"):
        ShardFrames([garbage], frames)[0]
    truncated = tmp_path / source.name  # cut inside a sample: the schema reader names the sample and shard
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    with pytest.raises(SampleError, match=f"in {truncated}: missing its .json"):
        ShardFrames([truncated], frames)[0]


def test_quality_svm_separates_spoiled_videos(quality_data, tmp_path):
    root, tag = quality_data
    datamodule = CurationDataModule(str(root / "videos"), tag, target="quality", labels=str(root / "labels.jsonl"),
                                    val_fraction=0.25, seed=0)
    module = QualityModule(folds=3, export_path=str(tmp_path / "svm.skops"))
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    print(f"held-out quality metrics: {module.metrics}")
    assert module.metrics["count"] == 24
    assert module.metrics["accuracy"] >= 0.7  # chance is 0.5 on this balanced split
    loaded = QualitySVM.load(tmp_path / "svm.skops")
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
        QualitySVM.load(tmp_path / "other.skops")
    with pytest.raises(FileNotFoundError, match="configs/curation/quality.yaml"):
        QualitySVM.load(tmp_path / "missing.skops")


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
    module = ElevationModule(feature_dim=512, hidden_dim=512, lr=1e-3, weight_decay=0.1)
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
    with pytest.raises(ValueError, match="set model.init_args.feature_dim 512"):
        L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False).fit(ElevationModule(feature_dim=10), datamodule=datamodule)
