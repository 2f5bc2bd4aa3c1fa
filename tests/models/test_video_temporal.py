"""Only the temporal layers of a video UNet train: selection by module, checked on tiny random backbones."""

import logging

import diffusers
import pytest
import torch
from torch import nn

from vfusion3d_lightning.models.video import VideoDiffusionModel, temporal_parameter_names, train_temporal_only

TINY_MODELSCOPE = dict(
    sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)


def tiny_svd_unet() -> nn.Module:
    torch.manual_seed(0)
    return VideoDiffusionModel.build("tiny-svd").unet


def test_svd_trains_exactly_its_temporal_layers(caplog):
    unet = tiny_svd_unet()
    with caplog.at_level(logging.INFO):
        trainable, total = train_temporal_only(unet)
    assert "training" in caplog.text and f"{trainable}" in caplog.text
    names = dict(unet.named_parameters())
    temporal = {n for n in names if any(k in n for k in ("temporal_res_block", "temporal_transformer_blocks",
                                                          "time_mixer", "time_pos_embed"))}
    assert {n for n, p in names.items() if p.requires_grad} == temporal
    assert trainable == sum(names[n].numel() for n in temporal) and 0.2 < trainable / total < 0.6
    # a diffusion step's gradients reach only the temporal layers
    sample = torch.randn(1, 16, 8, 8, 8)
    out = unet(sample, torch.tensor([10.0]), encoder_hidden_states=torch.randn(1, 1, 32),
               added_time_ids=torch.randn(1, 3)).sample
    out.square().mean().backward()
    with_grad = {n for n, p in names.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= temporal
    assert any("time_mixer" in n for n in with_grad) and any("temporal_transformer_blocks" in n for n in with_grad)


@pytest.mark.parametrize("kind", ["I2VGenXLUNet", "UNet3DConditionModel"])
def test_text_video_backbones_select_temp_layers(kind):
    torch.manual_seed(0)
    if kind == "I2VGenXLUNet":
        unet = VideoDiffusionModel.build("tiny-i2vgen-xl").unet
    else:
        unet = diffusers.UNet3DConditionModel(**TINY_MODELSCOPE)
    names = temporal_parameter_names(unet)
    assert names and all(n.split(".")[0] == "transformer_in" or ".temp_attentions." in n or ".temp_convs." in n
                         for n in names)
    assert any(".temp_convs." in n for n in names) and any(n.startswith("transformer_in.") for n in names)
    trainable, total = train_temporal_only(unet)
    assert trainable < total and sum(p.numel() for p in unet.parameters() if p.requires_grad) == trainable


def test_unknown_backbones_are_named():
    with pytest.raises(ValueError, match="no temporal-layer rule for Linear; supported backbones"):
        temporal_parameter_names(nn.Linear(2, 2))
