"""The YAML configs build what they name, through the parser LightningCLI uses."""

from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from vfusion3d_lightning import LRM, LRMConfig

NETWORKS = Path(__file__).resolve().parents[1] / "configs" / "lrm" / "network"


def parse_network(*args: str) -> LRMConfig:
    parser = ArgumentParser()
    parser.add_argument("--network", type=LRMConfig)
    return parser.instantiate(parser.parse_args(list(args))).network


@pytest.mark.parametrize("name, preset", [("tiny", LRMConfig.tiny()), ("vfusion3d", LRMConfig.vfusion3d())])
def test_network_configs_equal_the_presets(name, preset):
    assert parse_network("--network", str(NETWORKS / f"{name}.yaml")) == preset


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
    from vfusion3d_lightning.cli import lightning_cli

    command = "predict" if "return_predictions:" in config.read_text() else "fit"
    argv = [command, "--config", str(config)]
    if strategy:
        argv += ["--config", str(CONFIGS / "trainer" / f"{strategy}.yaml")]
    with pytest.raises(SystemExit) as done:
        lightning_cli(argv + ["--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: vfusion3d_lightning." in printed
