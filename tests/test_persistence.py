"""One persistence protocol for every model (LRM, VideoDiffusionModel, QualitySVM, ElevationMLP):
`save_pretrained(dir)` -> `from_pretrained(dir)` gives the same outputs; `from_pretrained` also reads the
`.ckpt` its LightningModule writes (the video model with its EMA weights by default) and a registry name,
whose missing file is one error line naming the file and where to fetch it."""

import dataclasses
import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vfusion3d_lightning import hub, presets
from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
from vfusion3d_lightning.models.curation.elevation import ElevationMLP
from vfusion3d_lightning.models.curation.features import DinoFeatures
from vfusion3d_lightning.models.curation.quality import QualitySVM
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.video import VideoDiffusionModel
from vfusion3d_lightning.training import ElevationModule, LRMModule, QualityModule, VideoDiffusionModule

DIM = 6  # curation feature width
FEATURES = torch.from_numpy(np.random.default_rng(0).normal(size=(16, DIM))).float()
LABELS = torch.tensor([0, 1] * 8)


# ---------------------------------------------------------------- the four models and an output of each


def tiny_lrm() -> LRM:
    torch.manual_seed(0)
    return LRM(LRMConfig.from_name("tiny")).eval()


def lrm_output(model: LRM) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.rand(2, 3, 56, 56), canonical_source_camera(2))


def tiny_video() -> VideoDiffusionModel:
    torch.manual_seed(0)
    return VideoDiffusionModel.build("tiny-svd").eval()


def video_output(model: VideoDiffusionModel) -> torch.Tensor:
    """The denoiser's output from frames through the VAE and the image encoder: every component takes part."""
    frames = torch.rand(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = model.encode_frames(frames, torch.Generator().manual_seed(2))
        cond = model.conditions(frames[:, 0], None, 4, generators=[torch.Generator().manual_seed(3)])
        return model(latents, torch.tensor([0.5]), cond)


def tiny_svm() -> QualitySVM:
    return QualitySVM(c_values=(1.0,), folds=2).fit(FEATURES.numpy(), LABELS.numpy(), "tag")


def svm_output(model: QualitySVM) -> torch.Tensor:
    return torch.from_numpy(model.score(FEATURES.numpy() + 0.1))


def tiny_mlp() -> ElevationMLP:
    torch.manual_seed(0)
    mlp = ElevationMLP(DIM, hidden_dim=4, feature_tag="tag")
    mlp.set_normalization(FEATURES * 2 + 1)
    return mlp.eval()


def mlp_output(model: ElevationMLP) -> torch.Tensor:
    with torch.no_grad():
        return model(FEATURES)


MODELS = {  # name: (class, build, output, the files save_pretrained writes besides README.md and config.json)
    "lrm": (LRM, tiny_lrm, lrm_output, "model.safetensors"),
    "video": (VideoDiffusionModel, tiny_video, video_output, "unet/diffusion_pytorch_model.safetensors"),
    "svm": (QualitySVM, tiny_svm, svm_output, "model.skops"),
    "mlp": (ElevationMLP, tiny_mlp, mlp_output, "model.safetensors"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_save_pretrained_then_from_pretrained_gives_the_same_outputs(name, tmp_path):
    cls, build, output, weights = MODELS[name]
    model = build()
    folder = model.save_pretrained(tmp_path / name)
    assert folder == tmp_path / name and (folder / weights).is_file()
    card = (folder / "README.md").read_text()
    assert f"{cls.__name__}.from_pretrained(FOLDER)" in card
    config = "model_index.json" if name == "video" else "config.json"  # the video model: diffusers' layout
    json.loads((folder / config).read_text())
    assert not list(folder.glob(".partial-*"))  # the temporary folder is gone
    loaded = cls.from_pretrained(folder)
    # the same weights (test_video_model.py compares them), but diffusers' loaded UNet sums in another order
    exact = {"rtol": 1e-5, "atol": 1e-5} if name == "video" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(output(loaded), output(model), **exact)
    # saving again over the folder replaces it in place and keeps files it does not write
    (folder / "notes.txt").write_text("mine")
    cls.from_pretrained(model.save_pretrained(folder))
    assert (folder / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- from a LightningModule's checkpoint


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def fit_one_step(module: L.LightningModule, loader: DataLoader, root: Path) -> Path:
    """One training step on the CPU, then the checkpoint Lightning writes for it."""
    # max_epochs too: QualityModule fits without optimizer steps, so max_steps alone would never end
    trainer = L.Trainer(accelerator="cpu", max_steps=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)
    trainer.fit(module, train_dataloaders=loader)
    path = root / f"{type(module).__name__}.ckpt"
    trainer.save_checkpoint(path)
    return path


def lrm_batches() -> DataLoader:
    torch.manual_seed(0)
    cameras = turntable_cameras(2)
    items = [{"input_image": torch.rand(3, 56, 56), "source_camera": canonical_source_camera(1)[0],
              "render_cameras": cameras, "target_images": torch.rand(2, 3, 16, 16),
              "target_masks": torch.ones(2, 1, 16, 16)} for _ in range(2)]
    return DataLoader(items, batch_size=2)


def video_batches() -> DataLoader:
    torch.manual_seed(0)
    items = [{"frames": torch.rand(16, 3, 32, 32), "prompt": "a chair"} for _ in range(2)]
    return DataLoader(items, batch_size=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[L.LightningModule, Path]]:
    """A checkpoint of each module after one training step, and the module that wrote it."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    # L2, not LPIPS: LPIPS's VGG needs larger patches
    lrm = LRMModule(network=LRMConfig.from_name("tiny"), lpips_random_backbone=True, lpips_weight=0.0,
                    l2_weight=1.0, render_size=16, patch_size=8, warmup_steps=1)
    torch.manual_seed(0)
    video = VideoDiffusionModule(model="tiny-svd", ema_decay=0.5, condition_dropout=0.0, warmup_steps=1,
                                 sample_every_n_epochs=0)
    quality = QualityModule(c_values=[1.0], folds=2)
    elevation = ElevationModule(feature_dim=DIM, hidden_dim=4)
    elevation.model.set_normalization(FEATURES)
    elevation.model.config["feature_tag"] = "tag"  # a datamodule with cached features sets it at fit start
    curation = DataLoader(TensorDataset(FEATURES, LABELS), batch_size=len(FEATURES))
    heights = DataLoader(TensorDataset(FEATURES, torch.rand(len(FEATURES))), batch_size=8)
    return {"lrm": (lrm, fit_one_step(lrm, lrm_batches(), root)),
            "video": (video, fit_one_step(video, video_batches(), root)),
            "svm": (quality, fit_one_step(quality, curation, root)),
            "mlp": (elevation, fit_one_step(elevation, heights, root))}


def test_each_model_loads_from_its_lightning_checkpoint(checkpoints):
    module, path = checkpoints["lrm"]
    torch.testing.assert_close(lrm_output(LRM.from_pretrained(path).eval()), lrm_output(module.model.eval()))
    module, path = checkpoints["svm"]
    torch.testing.assert_close(svm_output(QualitySVM.from_pretrained(path)), svm_output(module.svm))
    module, path = checkpoints["mlp"]
    mlp = ElevationMLP.from_pretrained(path)
    torch.testing.assert_close(mlp_output(mlp), mlp_output(module.model.eval()))
    assert mlp.config["feature_tag"] == "tag"  # recorded by ElevationModule, not a hyper-parameter


def test_the_video_checkpoint_loads_its_ema_weights_unless_asked_not_to(checkpoints, tmp_path):
    module, path = checkpoints["video"]
    shadow = torch.load(path, map_location="cpu", weights_only=True)["ema"]["shadow"]
    averaged = VideoDiffusionModel.from_pretrained(path)
    trained = VideoDiffusionModel.from_pretrained(path, use_ema=False)
    params = dict(averaged.unet.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in shadow.items())
    assert same_weights(trained, module.model)
    assert any(not torch.equal(params[name], module.model.unet.get_parameter(name)) for name in shadow)
    assert averaged.conditioning == module.model.conditioning
    # export writes the same averaged weights as a save_pretrained folder
    exported = VideoDiffusionModel.from_pretrained(module.export(tmp_path / "export"))
    assert same_weights(exported, averaged)


def test_a_video_checkpoint_over_a_pretrained_base_rebuilds_the_base(tmp_path):
    base = tiny_video().save_pretrained(tmp_path / "base")
    module = VideoDiffusionModule(model=str(base), condition_dropout=0.0, warmup_steps=1,
                                  sample_every_n_epochs=0, lr=1e-2)
    path = fit_one_step(module, video_batches(), tmp_path)
    held = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(key.startswith("model.unet.") for key in held)  # the trained layers only
    loaded = VideoDiffusionModel.from_pretrained(path)
    assert same_weights(loaded, module.model)
    cut = {**torch.load(path, weights_only=True), "state_dict": dict(list(held.items())[1:])}
    torch.save(cut, tmp_path / "cut.ckpt")
    with pytest.raises(ValueError, match=r"cut\.ckpt lacks 1 trained parameters of .*base"):
        VideoDiffusionModel.from_pretrained(tmp_path / "cut.ckpt")


LOADERS = {"lrm": (LRM.from_pretrained, "LRMModule"),
           "video": (VideoDiffusionModel.from_pretrained, "VideoDiffusionModule"),
           "svm": (QualitySVM.from_pretrained, "QualityModule"),
           "mlp": (ElevationMLP.from_pretrained, "ElevationModule")}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_another_modules_checkpoint_is_refused_naming_both(loader, checkpoints):
    load, module = LOADERS[loader]
    for other, (_, path) in checkpoints.items():
        if other != loader:
            with pytest.raises(ValueError, match=rf"{path.name} is not a checkpoint of {module} \(its "
                                                 rf"hyper-parameters are \[.*\]\); give one that "
                                                 rf"`vfusion3d-lightning fit --config"):
                load(path)


# ---------------------------------------------------------------- registry names


def with_entries(monkeypatch, **extra: hub.WeightsEntry) -> None:
    entries = {**hub.load_registry(), **extra}
    monkeypatch.setattr(hub, "load_registry", lambda: entries)


CURATION_ENTRIES = {
    "my-svm": hub.WeightsEntry("my-svm", "a quality SVM of ours", "https://example.org/svm", "my-svm",
                               None, "quality_svm"),
    "my-mlp": hub.WeightsEntry("my-mlp", "an elevation MLP of ours", "https://example.org/mlp", "my-mlp",
                               None, "elevation_mlp"),
}
REGISTRY_LOADS = {  # registry name: how it is loaded
    "vfusion3d": LRM.from_pretrained,
    "dinov2-base": lambda name: tiny_lrm().load_encoder_weights(name),
    "dino-vitb16": lambda name: DinoFeatures(weights=name),
    "svd-xt-pretrained": VideoDiffusionModel.from_pretrained,
    "my-svm": QualitySVM.from_pretrained,
    "my-mlp": ElevationMLP.from_pretrained,
}


@pytest.mark.parametrize("name", list(REGISTRY_LOADS))
def test_a_missing_registry_file_is_one_line_naming_the_file_and_its_source(name, tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CHECKPOINT_DIR_ENV, str(tmp_path))
    with_entries(monkeypatch, **CURATION_ENTRIES)
    entry = hub.load_registry()[name]
    with pytest.raises(FileNotFoundError) as err:
        REGISTRY_LOADS[name](name)
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"weights {name!r} ({entry.description}) not found: fetch {entry.source} and save it "
                       f"as {tmp_path / entry.filename}; or set ${hub.CHECKPOINT_DIR_ENV} to the folder that "
                       f"holds {entry.filename}")


def test_registry_names_load_each_model_from_the_checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CHECKPOINT_DIR_ENV, str(tmp_path))
    with_entries(monkeypatch, **CURATION_ENTRIES)
    tiny_svm().save_pretrained(tmp_path / "my-svm")
    tiny_mlp().save_pretrained(tmp_path / "my-mlp")
    torch.testing.assert_close(svm_output(QualitySVM.from_pretrained("my-svm")), svm_output(tiny_svm()))
    torch.testing.assert_close(mlp_output(ElevationMLP.from_pretrained("my-mlp")), mlp_output(tiny_mlp()))
    with pytest.raises(ValueError, match=r"'my-svm' \(a quality SVM of ours\) is not elevation MLP: it loads "
                                         r"with QualitySVM\.from_pretrained"):
        ElevationMLP.from_pretrained("my-svm")
    with pytest.raises(KeyError, match="no weights named 'nothing-here'.*known names"):
        QualitySVM.from_pretrained("nothing-here")


def test_the_registry_ships_in_the_package_and_the_checkpoint_dir_follows_the_install(tmp_path, monkeypatch):
    assert hub.registry_path() == presets.registry_path() and hub.registry_path().is_file()
    monkeypatch.setenv(hub.CHECKPOINT_DIR_ENV, str(tmp_path / "env"))
    assert hub.checkpoint_dir() == tmp_path / "env" and hub.checkpoint_dir(tmp_path) == tmp_path
    monkeypatch.delenv(hub.CHECKPOINT_DIR_ENV)
    assert hub.checkpoint_dir() == Path(__file__).resolve().parents[1] / "checkpoints"  # a source checkout
    monkeypatch.setattr(presets, "source_tree", lambda: None)  # a wheel install: no repository around it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert hub.checkpoint_dir() == tmp_path / "cache" / "vfusion3d_lightning" / "checkpoints"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.checkpoint_dir() == Path.home() / ".cache" / "vfusion3d_lightning" / "checkpoints"


def test_missing_weights_error_is_one_line():
    err = hub.missing_weights_error("weights 'x'\n(a model)", "https://example.org/x", "/w/x.bin", "or else")
    assert isinstance(err, FileNotFoundError)
    assert str(err) == ("weights 'x' (a model) not found: fetch https://example.org/x and save it as "
                        "/w/x.bin; or else")


def test_a_tampered_lightning_checkpoint_is_refused_for_every_model(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"network": Payload()}}, path)
    for load, _ in LOADERS.values():
        with pytest.raises(ValueError, match="refusing to load"):
            load(path)
    assert not (tmp_path / "pwned").exists()


def test_lrm_checkpoint_with_an_explicit_config_must_fit_it(checkpoints):
    _, path = checkpoints["lrm"]
    other = dataclasses.replace(LRMConfig.from_name("tiny"), triplane_dim=4)
    with pytest.raises(ValueError, match=r"(?s)weights from .*LRMModule\.ckpt do not fit this model:.*shape "
                                         r"mismatch"):
        LRM.from_pretrained(path, config=other)
