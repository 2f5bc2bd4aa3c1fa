import pytest
import torch
import torchvision

from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.training.losses import build_lpips, lpips_loss, opacity_loss
from vfusion3d_lightning.training.lrm import decay_groups


def test_missing_vgg_weights_say_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_lpips()
    with pytest.raises(FileNotFoundError, match="lpips_random_backbone"):
        build_lpips(str(tmp_path / "nothing.pth"))


def test_lpips_trunk_loads_from_a_local_vgg16_file(tmp_path):
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    model = build_lpips(str(path))
    assert torch.equal(model.net.slice1[0].weight, vgg.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "28").bias, vgg.features[28].bias)  # the last convolution
    assert not any(p.requires_grad for p in model.parameters())
    image = torch.rand(2, 3, 32, 32)
    assert lpips_loss(model, image, image).item() == pytest.approx(0.0, abs=1e-6)
    assert lpips_loss(model, image, torch.rand(2, 3, 32, 32)).item() > 0.01


def test_opacity_loss_is_mse_against_the_mask():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    assert opacity_loss(mask, mask).item() == 0
    assert opacity_loss(torch.ones_like(mask), mask).item() == pytest.approx(0.5)


def test_weight_decay_skips_biases_norms_and_position_embeddings():
    model = LRM(LRMConfig.from_name("tiny"))
    decay, no_decay = decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "transformer.blocks.0.cross_attn.to_q.weight" in decayed and "decoder.layers.0.weight" in decayed
    assert "encoder.vit.patch_embed.proj.weight" in decayed
    assert {"transformer.pos_embed", "encoder.vit.pos_embed", "encoder.vit.cls_token", "decoder.layers.0.bias",
            "transformer.norm.weight", "encoder.vit.blocks.0.ls1.gamma"} <= exempt
    assert len(decayed) + len(exempt) == len(list(model.parameters()))
