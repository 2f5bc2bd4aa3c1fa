import dataclasses
import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vfusion3d_lightning import hub as registry
from vfusion3d_lightning.cameras import add_camera_noise, canonical_source_camera, turntable_cameras
from vfusion3d_lightning.models.lrm import LRM, LRMConfig


def tiny_batch(batch: int = 2):
    torch.manual_seed(1)
    return torch.rand(batch, 3, 56, 56), canonical_source_camera(batch)


def test_tiny_forward_and_backward_reach_every_parameter():
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny"))
    image, camera = tiny_batch()
    planes = model(image, add_camera_noise(camera, 0.02))
    assert planes.shape == (2, 3, 8, 16, 16)
    out = model.render(planes, turntable_cameras(2)[None].expand(2, -1, -1), size=24, patch=(4, 4, 12))
    loss = (out.rgb - 0.5).square().mean() + out.opacity.mean()
    loss.backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert without_grad == []
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("decoder"))


@pytest.mark.parametrize("mode", [True, "selective"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny"))
    image, camera = tiny_batch()
    model(image, camera).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("encoder.") for n in reference) and any(n.startswith("transformer.") for n in reference)
    model.zero_grad()
    model.set_gradient_checkpointing(mode)
    calls = []
    for block in (model.encoder.vit.blocks[0], model.transformer.blocks[0]):
        def counted(*args, _forward=block.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)

        block.forward = counted
    model(image, camera).square().mean().backward()
    assert len(calls) == 4  # each block ran again during the backward pass
    for name, grad in reference.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name


def test_recomputing_some_transformer_blocks_keeps_gradients_and_skips_the_rest():
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny"))
    image, camera = tiny_batch()
    model(image, camera).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_gradient_checkpointing(True, transformer_blocks=1)
    calls = {0: 0, 1: 0}
    for index, block in enumerate(model.transformer.blocks):
        def counted(*args, _forward=block.forward, _index=index, **kwargs):
            calls[_index] += 1
            return _forward(*args, **kwargs)

        block.forward = counted
    model(image, camera).square().mean().backward()
    assert calls == {0: 2, 1: 1}  # the first block ran again in the backward pass, the second kept its activations
    for name, grad in reference.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name
    with pytest.raises(ValueError,
                       match=r"transformer_blocks must be None or 0..2 \(the transformer's blocks\), got 3"):
        model.set_gradient_checkpointing(True, transformer_blocks=3)


def test_selective_checkpointing_recomputes_no_matrix_products():
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny"))
    image, camera = tiny_batch()

    def step_flops(mode) -> int:
        model.set_gradient_checkpointing(mode)
        with FlopCounterMode(display=False) as counter:
            model(image, camera).square().mean().backward()
        return counter.get_total_flops()

    kept, selective, full = step_flops(False), step_flops("selective"), step_flops(True)
    assert selective == kept
    assert full > 1.2 * kept  # the full recompute repeats the forward products
    with pytest.raises(ValueError, match="enabled must be true, false or 'selective'"):
        model.set_gradient_checkpointing("network")


def test_save_and_load_pretrained_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    config = dataclasses.replace(LRMConfig.from_name("tiny"), triplane_dim=6)
    model = LRM(config).eval()
    model.save_pretrained(tmp_path / "lrm")
    assert sorted(os.listdir(tmp_path / "lrm")) == ["README.md", "config.json", "model.safetensors"]
    assert "LRM.from_pretrained(FOLDER)" in (tmp_path / "lrm" / "README.md").read_text()
    assert json.loads((tmp_path / "lrm" / "config.json").read_text())["triplane_dim"] == 6
    loaded = LRM.from_pretrained(tmp_path / "lrm").eval()
    assert loaded.config == config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    image, camera = tiny_batch()
    cameras = turntable_cameras(2)[None].expand(2, -1, -1)
    with torch.no_grad():
        a = model.render(model(image, camera), cameras, 16, generator=torch.Generator().manual_seed(3))
        b = loaded.render(loaded(image, camera), cameras, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.depth, b.depth)
    # the weights file alone finds its config beside it
    again = LRM.from_pretrained(tmp_path / "lrm" / "model.safetensors")
    assert again.config == config


def test_loading_into_the_wrong_config_names_the_keys(tmp_path):
    LRM(LRMConfig.from_name("tiny")).save_pretrained(tmp_path / "lrm")
    other = dataclasses.replace(LRMConfig.from_name("tiny"), triplane_dim=12, transformer_layers=3)
    with pytest.raises(ValueError) as err:
        LRM.from_pretrained(tmp_path / "lrm", config=other)
    message = str(err.value)
    assert "missing (" in message and "transformer.blocks.2" in message
    assert "shape mismatch" in message and "transformer.upsample.weight" in message


def test_missing_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LRM weights at"):
        LRM.from_pretrained(tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a save_pretrained folder"):
        LRM.from_pretrained(tmp_path / "empty")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        LRM.from_pretrained(tmp_path / "broken.safetensors", config=LRMConfig.from_name("tiny"))
    model = LRM(LRMConfig.from_name("tiny"))
    with pytest.raises(ValueError, match="NaN"):
        model(torch.rand(1, 3, 56, 56), torch.full((1, 16), float("nan")))
    with pytest.raises(ValueError, match="source_camera must be"):
        model(torch.rand(1, 3, 56, 56), torch.zeros(1, 25))


class _Payload:
    """Unpickling this would create a file: proof that code in a checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "vfusion3dckpt"
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "extra": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        LRM.from_pretrained(path)
    assert not marker.exists()


def test_registry_names_resolve_to_files_with_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(registry.CHECKPOINT_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        LRM.from_pretrained("vfusion3d")
    message = str(err.value)
    assert "\n" not in message and message.startswith("weights 'vfusion3d' (Released VFusion3D LRM")
    assert (f"not found: fetch https://huggingface.co/facebook/vfusion3d (the released torch checkpoint "
            f"`vfusion3dckpt`) and save it as {tmp_path / 'vfusion3d' / 'vfusion3dckpt'}") in message
    with pytest.raises(KeyError, match="known names"):
        LRM.from_pretrained("no-such-weights")
    model = LRM(LRMConfig.from_name("tiny"))
    with pytest.raises(FileNotFoundError, match="dinov2-base"):
        model.load_encoder_weights("dinov2-base")
    # a present file with a wrong digest is refused; without a digest the computed one is printed
    weights = tmp_path / "dinov2-base" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    entries = registry.load_registry()
    pinned = {**entries, "dinov2-base": dataclasses.replace(entries["dinov2-base"], sha256="0" * 64)}
    monkeypatch.setattr(registry, "load_registry", lambda: pinned)
    with pytest.raises(ValueError, match="registry expects"):
        registry.resolve_weights("dinov2-base")
    monkeypatch.setattr(registry, "load_registry", lambda: entries)
    registry.resolve_weights("dinov2-base")
    assert registry.sha256_of(weights) in capsys.readouterr().out
    # an entry that holds other weights is refused, naming what loads it
    with pytest.raises(ValueError, match=r"'dinov2-base' .* is not LRM weights: it loads with "
                                         r"LRM\.load_encoder_weights"):
        LRM.from_pretrained("dinov2-base")


def test_registry_file_lists_known_weights():
    entries = registry.load_registry()
    assert {"vfusion3d", "dinov2-base"} <= set(entries)
    assert entries["vfusion3d"].converter == "vfusion3d_released"


def test_selective_checkpointing_under_autocast_with_leaf_image_tokens():
    # autocast caches the bf16 cast of an fp32 leaf across blocks; the recompute must still match the forward
    torch.manual_seed(0)
    transformer = LRM(LRMConfig.from_name("tiny")).transformer
    tokens = torch.randn(2, 5, transformer.blocks[0].cross_attn.to_k.in_features, requires_grad=True)
    camera = torch.randn(2, transformer.blocks[0].norm_cross.modulation.in_features)
    grads = []
    for mode in (False, "selective"):
        transformer.gradient_checkpointing = mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            planes = transformer(tokens, camera)
        planes.float().square().mean().backward()
        grads.append(tokens.grad.clone())
        tokens.grad = None
    assert (grads[0] - grads[1]).abs().max() < 0.01 * grads[0].abs().max()  # bf16 rounding apart


def test_network_weights_cast_once_give_autocasts_planes_bit_for_bit():
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny")).eval()
    image = torch.rand(2, 3, 56, 56)
    camera = canonical_source_camera(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_planes = model(image, camera)
        model.cast_network_weights(torch.bfloat16)
        held_planes = model(image, camera)
    assert torch.equal(held_planes, autocast_planes)
    assert model.transformer.blocks[0].self_attn.to_qkv.weight.dtype == torch.bfloat16
    assert model.encoder.vit.patch_embed.proj.weight.dtype == torch.bfloat16
    assert model.transformer.norm.weight.dtype == torch.float32  # autocast runs norms in float32
    assert all(p.dtype == torch.float32 for p in model.decoder.parameters())
    with pytest.raises(RuntimeError, match=r"torch.autocast\('cpu', dtype=torch.bfloat16\)"):
        model(image, camera)
    with pytest.raises(ValueError, match="torch.bfloat16 or torch.float16"):
        model.cast_network_weights(torch.float32)
