"""The YAML configs build the networks they name, through the parser LightningCLI uses."""

from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from vfusion3d_lightning import LRM, LRMConfig

NETWORKS = Path(__file__).resolve().parents[1] / "configs" / "lrm" / "network"


def parse(*args: str):
    parser = ArgumentParser()
    parser.add_subclass_arguments(LRM, "model")
    return parser, parser.parse_args(list(args))


@pytest.mark.parametrize("name, preset", [("tiny", LRMConfig.tiny()), ("vfusion3d", LRMConfig.vfusion3d())])
def test_network_configs_equal_the_presets(name, preset):
    _, args = parse("--model", str(NETWORKS / f"{name}.yaml"))
    assert args.model.class_path == "vfusion3d_lightning.LRM"
    assert LRMConfig.from_dict(args.model.init_args.config.as_dict()) == preset


def test_tiny_config_builds_a_working_model_and_takes_overrides():
    parser, args = parse("--model", str(NETWORKS / "tiny.yaml"), "--model.init_args.config.triplane_dim", "12")
    model = parser.instantiate(args).model
    assert isinstance(model, LRM)
    assert model.config.triplane_dim == 12 and model.decoder.layers[0].in_features == 36
    planes = model(torch.rand(1, 3, 56, 56), torch.zeros(1, 16))
    assert planes.shape == (1, 3, 12, 16, 16)
