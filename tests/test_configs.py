"""The YAML configs build what they name, through the parser LightningCLI uses."""

from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from vfusion3d_lightning import LRM, LRMConfig, presets

NETWORKS = Path(__file__).resolve().parents[1] / "configs" / "lrm" / "network"


def parse_network(*args: str) -> LRMConfig:
    parser = ArgumentParser()
    parser.add_argument("--network", type=LRMConfig)
    return parser.instantiate(parser.parse_args(list(args))).network


@pytest.mark.parametrize("name", presets.network_names())
def test_every_shipped_network_size_builds_its_config(name):
    # one home for the sizes: LRMConfig.from_name reads the shipped YAML that training configs point at
    config = LRMConfig.from_name(name)
    assert config == parse_network("--network", str(presets.shipped_config(f"lrm/network/{name}")))
    assert LRMConfig.from_dict(config.to_dict()) == config
    if name == "tiny":  # the others are the size of real networks: their config is enough here
        planes = LRM(config)(torch.rand(1, 3, config.encoder_img_size, config.encoder_img_size), torch.zeros(1, 16))
        assert planes.shape == (1, 3, config.triplane_dim, config.triplane_high_res, config.triplane_high_res)


def test_network_names_are_the_shipped_files_and_unknown_names_list_them():
    assert {"tiny", "vfusion3d"} <= set(presets.network_names())
    assert presets.network_names() == sorted(path.stem for path in NETWORKS.glob("*.yaml"))
    with pytest.raises(ValueError, match=r"unknown LRM network 'huge'.*\['quickstart', 'tiny', 'vfusion3d'\]"):
        LRMConfig.from_name("huge")


def test_registry_configs_name_shipped_network_sizes():
    from vfusion3d_lightning import hub
    from vfusion3d_lightning.models.video import ARCHITECTURES

    for name, entry in hub.load_registry().items():
        if entry.converter in ("vfusion3d_released", "dinov2_hf", "lrm"):
            assert entry.config in presets.network_names(), name
            LRMConfig.from_name(entry.config)
        assert name not in ARCHITECTURES  # a registry name must not shadow a random-weights architecture


def test_shipped_configs_resolve_by_name_and_list_every_file():
    root = presets.configs_root()
    files = root.rglob("*.yaml")
    assert presets.list_configs() == sorted(p.relative_to(root).with_suffix("").as_posix() for p in files)
    for name in ("lrm/tiny", "lrm/tiny.yaml", "configs/lrm/tiny.yaml"):
        assert presets.shipped_config(name) == root / "lrm" / "tiny.yaml"
    for wrong in ("lrm/huge", "../checkpoints/registry"):
        with pytest.raises(FileNotFoundError, match="no shipped config named .*lrm/tiny"):
            presets.shipped_config(wrong)
    assert presets.callbacks_preset().name == "vfusion3d_stages.yaml"
    assert presets.callbacks_preset("vfusion3d_stages.yaml") == presets.callbacks_preset()
    with pytest.raises(FileNotFoundError, match="vfusion3d_stages"):
        presets.callbacks_preset("other")
    assert presets.registry_path().name == "registry.yaml"


def test_tiny_network_config_builds_a_working_model_and_takes_overrides():
    config = parse_network("--network", str(NETWORKS / "tiny.yaml"), "--network.triplane_dim", "12")
    model = LRM(config)
    assert model.config.triplane_dim == 12 and model.decoder.layers[0].in_features == 36
    planes = model(torch.rand(1, 3, 56, 56), torch.zeros(1, 16))
    assert planes.shape == (1, 3, 12, 16, 16)


CONFIGS = NETWORKS.parents[1]
TRAINING_CONFIGS = sorted(path for folder in ("lrm", "video", "curation") for path in (CONFIGS / folder).glob("*.yaml"))


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda path: f"{path.parent.name}/{path.name}")
@pytest.mark.parametrize("strategy", [None, "ddp", "fsdp"])
def test_training_configs_parse_through_lightning_cli(config, strategy, capsys):
    # every key a config sets must be an argument of its classes (a misspelt or removed one fails here),
    # also composed with the multi-GPU strategies; nothing is built
    from vfusion3d_lightning.training.lightning_cli import lightning_cli

    command = "predict" if "return_predictions:" in config.read_text() else "fit"
    argv = [command, "--config", str(config)]
    if strategy:
        argv += ["--config", str(CONFIGS / "trainer" / f"{strategy}.yaml")]
    with pytest.raises(SystemExit) as done:
        lightning_cli(argv + ["--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: vfusion3d_lightning." in printed


FIT_CONFIGS = [path for path in TRAINING_CONFIGS if "train_shards:" in path.read_text()]


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_training_configs_validate_on_held_out_data(config):
    # validation on the training shards would hide overfitting: every shipped config names other data
    import yaml

    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    train, val = data["train_shards"], data.get("val_shards")
    assert len(FIT_CONFIGS) >= 9
    assert val is None or val != train, f"{config} validates on its training shards {train}"
    if val is None:  # then a held-out fraction of the training data
        assert 0 < data.get("val_fraction", 0) < 1, f"{config} has neither val_shards nor val_fraction"
