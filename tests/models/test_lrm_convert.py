"""Released VFusion3D checkpoints load into our LRM and compute what the released modules compute."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers  # the test extra installs it: Dinov2Model is the reference for the encoder
from torch import nn

from vfusion3d_lightning.cameras import canonical_source_camera
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.convert import convert_released_lrm, hf_dinov2_to_timm
from vfusion3d_lightning.models.lrm.encoder import DinoEncoder, resample_patch_pos_embed

SPEC = Path(__file__).resolve().parents[1] / "fixtures" / "vfusion3d_state_dict.txt"
DINO_TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=192, image_size=56,
                 patch_size=14, layer_norm_eps=1e-6)
TIMM_TINY = {"img_size": 56, "depth": 2, "embed_dim": 48, "num_heads": 2}


def released_spec() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in SPEC.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split()
        assert dtype == "float32"
        shapes[name] = tuple(int(s) for s in shape.split("x"))
    return shapes


def to_2024_names(state: dict) -> dict:
    """transformers' late-2026 Dinov2 names -> the 2024 names of the released checkpoint."""
    renames = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
               ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}
    out = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        out[key] = value
    return out


def hf_dinov2(**overrides) -> "transformers.Dinov2Model":
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**{**DINO_TINY, **overrides})).eval()
    with torch.no_grad():  # layer scale starts at 1.0; make it matter
        for name, param in model.named_parameters():
            if "lambda1" in name:
                param.uniform_(0.5, 1.5)
    return model


def encoder_from_hf(hf_model, timm_name="vit_small_patch14_dinov2", overrides=TIMM_TINY) -> DinoEncoder:
    encoder = DinoEncoder(timm_name, overrides).eval()
    encoder.vit.load_state_dict(hf_dinov2_to_timm(to_2024_names(hf_model.state_dict())), strict=True)
    return encoder


def hf_tokens(hf_model, image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return hf_model(pixel_values=(image - mean) / std).last_hidden_state


@pytest.mark.parametrize("names", ["2024", "2026"])
def test_tiny_encoder_matches_transformers_dinov2(names):
    hf_model = hf_dinov2()
    encoder = DinoEncoder("vit_small_patch14_dinov2", TIMM_TINY).eval()
    state = hf_model.state_dict()
    state = to_2024_names(state) if names == "2024" else state
    encoder.vit.load_state_dict(hf_dinov2_to_timm(state), strict=True)
    image = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        ours, reference = encoder(image), hf_tokens(hf_model, image)
    assert ours.shape == reference.shape == (2, 17, 48)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_base_encoder_matches_transformers_dinov2_at_the_native_grid():
    hf_model = hf_dinov2(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                         image_size=518)
    encoder = encoder_from_hf(hf_model, "vit_base_patch14_dinov2", {"depth": 2})
    image = torch.rand(1, 3, 518, 518)
    with torch.no_grad():
        assert torch.allclose(encoder(image), hf_tokens(hf_model, image), atol=1e-4)


def bicubic_by_scale_factor(grid: np.ndarray, out_size: int, scale: float) -> np.ndarray:
    """Reference: separable cubic convolution (A = -0.75), source = (dst + 0.5) / scale - 0.5, edge clamp."""

    def weights(t):
        a = -0.75
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
        return 0.0

    size = grid.shape[0]
    matrix = np.zeros((out_size, size))
    for dst in range(out_size):
        src = (dst + 0.5) / scale - 0.5
        base = int(np.floor(src))
        for tap in range(base - 1, base + 3):
            matrix[dst, min(max(tap, 0), size - 1)] += weights(src - tap)
    return np.einsum("ij,jkc,lk->ilc", matrix, grid, matrix)


def test_position_embeddings_are_resampled_by_scale_factor_as_released():
    torch.manual_seed(0)
    pos = torch.randn(1, 37 * 37, 8)
    ours = resample_patch_pos_embed(pos, 36, 36).reshape(36, 36, 8)
    reference = bicubic_by_scale_factor(pos.reshape(37, 37, 8).double().numpy(), 36, 36.1 / 37)
    assert np.allclose(ours.numpy(), reference, atol=1e-5)
    by_size = F.interpolate(pos.reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(36, 36), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1)[0]
    assert (ours - by_size).abs().max() > 1e-3  # the two conventions really differ
    # as F.interpolate by scale factor (how the released model ran), gradients included
    assert torch.allclose(ours.reshape(1, 36 * 36, 8), interpolated_by_scale_factor(pos, 36, 36), atol=1e-5)
    leaf = pos.clone().requires_grad_(True)
    upstream = torch.randn(1, 36 * 36, 8)
    (resample_patch_pos_embed(leaf, 36, 36) * upstream).sum().backward()
    bicubic_leaf = pos.clone().requires_grad_(True)
    (interpolated_by_scale_factor(bicubic_leaf, 36, 36) * upstream).sum().backward()
    assert torch.allclose(leaf.grad, bicubic_leaf.grad, atol=1e-5)
    # and for other grids, rectangular ones included
    small = torch.randn(1, 16, 3)
    assert torch.allclose(resample_patch_pos_embed(small, 3, 5), interpolated_by_scale_factor(small, 3, 5), atol=1e-6)


def interpolated_by_scale_factor(pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The released resampling as F.interpolate ran it: (1, G*G, D) -> (1, grid_h*grid_w, D)."""
    side, dim = math.isqrt(pos.shape[1]), pos.shape[-1]
    grid = F.interpolate(pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
                         scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic",
                         align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)


def test_resampled_encoder_is_close_to_transformers_but_follows_the_release():
    # transformers now resamples to the target size; the released model ran by scale factor: close, not equal
    hf_model = hf_dinov2()
    encoder = encoder_from_hf(hf_model)
    image = torch.rand(1, 3, 75, 73)  # 5x5 patches from a 4x4 grid; the last 5 rows and 3 columns fall away
    with torch.no_grad():
        ours, theirs = encoder(image), hf_tokens(hf_model, image)
    assert ours.shape == theirs.shape == (1, 26, 48)
    assert torch.allclose(ours, theirs, atol=0.1)


class ReleasedModLN(nn.Module):
    def __init__(self, dim, mod_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(mod_dim, 2 * dim))

    def forward(self, x, mod):
        shift, scale = self.mlp(mod).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ReleasedBlock(nn.Module):
    """The released block as the spec describes it, on torch's nn.MultiheadAttention."""

    def __init__(self, dim, context_dim, mod_dim, heads):
        super().__init__()
        self.norm1 = ReleasedModLN(dim, mod_dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, bias=False,
                                                batch_first=True)
        self.norm2 = ReleasedModLN(dim, mod_dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
        self.norm3 = ReleasedModLN(dim, mod_dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x, cond, mod):
        x = x + self.cross_attn(self.norm1(x, mod), cond, cond, need_weights=False)[0]
        h = self.norm2(x, mod)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm3(x, mod))


class ReleasedLRM(nn.Module):
    """Camera embedder, transformer and decoder with the released parameter names (no encoder)."""

    def __init__(self, dim=32, context_dim=48, mod_dim=32, heads=2, layers=2, low_res=8, triplane_dim=8):
        super().__init__()
        self.low_res = low_res
        self.camera_embedder = nn.Module()
        self.camera_embedder.mlp = nn.Sequential(nn.Linear(16, mod_dim), nn.SiLU(), nn.Linear(mod_dim, mod_dim))
        self.transformer = nn.Module()
        self.transformer.pos_embed = nn.Parameter(torch.randn(1, 3 * low_res**2, dim))
        self.transformer.layers = nn.ModuleList(ReleasedBlock(dim, context_dim, mod_dim, heads) for _ in range(layers))
        self.transformer.norm = nn.LayerNorm(dim, eps=1e-6)
        self.transformer.deconv = nn.ConvTranspose2d(dim, triplane_dim, 2, 2)
        self.synthesizer = nn.Module()
        self.synthesizer.decoder = nn.Module()
        self.synthesizer.decoder.net = nn.Sequential(
            nn.Linear(3 * triplane_dim, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
            nn.Linear(16, 4))

    def planes(self, tokens, camera):
        mod = self.camera_embedder.mlp(camera)
        x = self.transformer.pos_embed.repeat(tokens.shape[0], 1, 1)
        for layer in self.transformer.layers:
            x = layer(x, tokens, mod)
        x = self.transformer.norm(x)
        n, r = tokens.shape[0], self.low_res
        x = torch.einsum("nihwd->indhw", x.view(n, 3, r, r, -1)).reshape(3 * n, -1, r, r)
        x = self.transformer.deconv(x)
        return torch.einsum("indhw->nidhw", x.view(3, n, *x.shape[-3:]))


def released_tiny_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights under the released names (transformers' 2024 encoder names, the released camera embedder,
    transformer and synthesizer) for the network of LRMConfig.from_name("tiny"); `seed` varies all but the
    encoder. tests/test_hub_loading.py builds Hub caches from it."""
    state = {f"encoder.model.{k}": v for k, v in to_2024_names(hf_dinov2().state_dict()).items()}
    torch.manual_seed(seed)
    released = ReleasedLRM()
    with torch.no_grad():
        for param in released.parameters():
            param.normal_(0, 0.2)
    state.update(released.state_dict())
    return state


def test_released_tiny_state_loads_into_the_tiny_network():
    state = released_tiny_state()
    assert "encoder.model.encoder.layer.1.attention.attention.query.weight" in state
    LRM(LRMConfig.from_name("tiny")).load_state_dict(convert_released_lrm(state), strict=True)


def test_converted_tiny_release_computes_what_the_released_modules_compute():
    hf_model = hf_dinov2()
    torch.manual_seed(1)
    released = ReleasedLRM().eval()
    with torch.no_grad():
        for param in released.parameters():
            param.normal_(0, 0.2)
    state = {f"encoder.model.{k}": v for k, v in to_2024_names(hf_model.state_dict()).items()}
    state.update(released.state_dict())
    model = LRM(LRMConfig.from_name("tiny")).eval()
    model.load_state_dict(convert_released_lrm(state), strict=True)

    image = torch.rand(2, 3, 56, 56)
    camera = canonical_source_camera(2) + 0.1 * torch.randn(2, 16)
    with torch.no_grad():
        tokens = hf_tokens(hf_model, image)
        expected_planes = released.planes(tokens, camera)
        planes = model(image, camera)
        assert torch.allclose(planes, expected_planes, atol=1e-4)
        features = torch.randn(2, 100, 24)
        raw = released.synthesizer.decoder.net(features)
        raw_sigma, rgb = model.decoder(features)
        assert torch.allclose(raw_sigma, raw[..., :1], atol=1e-6)
        assert torch.allclose(rgb, torch.sigmoid(raw[..., 1:]) * 1.002 - 0.001, atol=1e-6)


def _fingerprint(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def test_released_checkpoint_with_every_name_loads_exactly(tmp_path):
    spec = released_spec()
    assert sum(int(np.prod(s)) for s in spec.values()) == 452_135_700
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) for name, shape in spec.items()}
    path = tmp_path / "vfusion3dckpt"
    torch.save({"model_state_dict": state, "epoch": 29}, path)  # saved the released way

    model = LRM.from_pretrained(path)
    assert model.config == LRMConfig.from_name("vfusion3d")
    loaded = model.state_dict()
    del model

    # every source tensor arrives unchanged: q/k/v land in timm's fused qkv, in that order
    dim = 768
    pieces = []
    for name, value in loaded.items():
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            pieces.extend(value.split(dim))
        else:
            pieces.append(value)
    source = sorted(_fingerprint(v) for k, v in state.items() if not k.endswith("mask_token"))
    assert sorted(_fingerprint(p) for p in pieces) == source

    # and lands in the right place
    layer = "encoder.model.encoder.layer.5."
    qkv = loaded["encoder.vit.blocks.5.attn.qkv.weight"]
    assert torch.equal(qkv[:dim], state[layer + "attention.attention.query.weight"])
    assert torch.equal(qkv[dim:2 * dim], state[layer + "attention.attention.key.weight"])
    assert torch.equal(qkv[2 * dim:], state[layer + "attention.attention.value.weight"])
    assert torch.equal(loaded["encoder.vit.blocks.5.ls2.gamma"], state[layer + "layer_scale2.lambda1"])
    assert torch.equal(loaded["encoder.vit.pos_embed"], state["encoder.model.embeddings.position_embeddings"])
    assert torch.equal(loaded["transformer.blocks.7.norm_self.modulation.weight"],
                       state["transformer.layers.7.norm2.mlp.1.weight"])
    assert torch.equal(loaded["transformer.blocks.15.cross_attn.to_k.weight"],
                       state["transformer.layers.15.cross_attn.k_proj_weight"])
    assert torch.equal(loaded["transformer.blocks.3.mlp.fc2.bias"], state["transformer.layers.3.mlp.3.bias"])
    assert torch.equal(loaded["transformer.upsample.weight"], state["transformer.deconv.weight"])
    assert torch.equal(loaded["decoder.layers.2.weight"], state["synthesizer.decoder.net.4.weight"])


def test_released_names_with_a_wrapper_prefix_and_wrong_names():
    hf_model = hf_dinov2()
    released = ReleasedLRM()
    state = {f"encoder.model.{k}": v for k, v in hf_model.state_dict().items()}  # 2026 attention names
    state.update(released.state_dict())
    prefixed = {f"module.{k}": v for k, v in state.items()}
    converted = convert_released_lrm(prefixed)
    LRM(LRMConfig.from_name("tiny")).load_state_dict(converted, strict=True)
    state["transformer.layers.0.unknown.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="transformer.layers.0.unknown.weight"):
        convert_released_lrm(state)
