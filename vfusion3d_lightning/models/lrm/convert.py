"""Converters from released parameter names into ours.

- transformers' Dinov2Model names (2024: attention.attention.query|key|value, attention.output.dense;
  late 2026: attention.q_proj|k_proj|v_proj|o_proj) -> timm VisionTransformer names, q/k/v fused.
- the released VFusion3D LRM (`model_state_dict` of its torch checkpoint) -> our LRM names.
"""

from __future__ import annotations

import re

import torch

# DINOv2's mask token serves masked-image pre-training only; the LRM never uses it.
IGNORED_RELEASED_KEYS = frozenset({"encoder.model.embeddings.mask_token"})
RELEASED_ANCHOR = "encoder.model.embeddings.cls_token"

_HF_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_LAYER_PARTS = {
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_QKV_PARTS = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+?)(\.weight|\.bias)?$")


def hf_dinov2_to_timm(state: dict[str, torch.Tensor], ignore: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """transformers Dinov2Model state dict (no prefix) -> timm VisionTransformer state dict."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if key in ignore or key == "embeddings.mask_token":
            continue
        if key in _HF_EMBEDDINGS:
            out[_HF_EMBEDDINGS[key]] = value
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            unknown.append(key)
            continue
        index, part, suffix = int(match.group(1)), match.group(2), match.group(3) or ""
        if part in _HF_QKV_PARTS:
            qkv.setdefault((index, suffix), {})[_HF_QKV_PARTS[part]] = value
        elif part in _HF_LAYER_PARTS:
            out[f"blocks.{index}.{_HF_LAYER_PARTS[part]}{suffix}"] = value
        else:
            unknown.append(key)
    for (index, suffix), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"DINOv2 layer {index} attention{suffix} has only {sorted(parts)} of query, key and value")
        out[f"blocks.{index}.attn.qkv{suffix}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise KeyError(f"unrecognised DINOv2 parameter names (first 10 of {len(unknown)}): {unknown[:10]}")
    return out


_RELEASED_DIRECT = [
    (r"camera_embedder\.mlp\.0\.(weight|bias)", r"camera_embedder.fc1.\1"),
    (r"camera_embedder\.mlp\.2\.(weight|bias)", r"camera_embedder.fc2.\1"),
    (r"transformer\.pos_embed", r"transformer.pos_embed"),
    (r"transformer\.layers\.(\d+)\.norm1\.norm\.(weight|bias)", r"transformer.blocks.\1.norm_cross.norm.\2"),
    (r"transformer\.layers\.(\d+)\.norm1\.mlp\.1\.(weight|bias)", r"transformer.blocks.\1.norm_cross.modulation.\2"),
    (r"transformer\.layers\.(\d+)\.norm2\.norm\.(weight|bias)", r"transformer.blocks.\1.norm_self.norm.\2"),
    (r"transformer\.layers\.(\d+)\.norm2\.mlp\.1\.(weight|bias)", r"transformer.blocks.\1.norm_self.modulation.\2"),
    (r"transformer\.layers\.(\d+)\.norm3\.norm\.(weight|bias)", r"transformer.blocks.\1.norm_mlp.norm.\2"),
    (r"transformer\.layers\.(\d+)\.norm3\.mlp\.1\.(weight|bias)", r"transformer.blocks.\1.norm_mlp.modulation.\2"),
    (r"transformer\.layers\.(\d+)\.cross_attn\.q_proj_weight", r"transformer.blocks.\1.cross_attn.to_q.weight"),
    (r"transformer\.layers\.(\d+)\.cross_attn\.k_proj_weight", r"transformer.blocks.\1.cross_attn.to_k.weight"),
    (r"transformer\.layers\.(\d+)\.cross_attn\.v_proj_weight", r"transformer.blocks.\1.cross_attn.to_v.weight"),
    (r"transformer\.layers\.(\d+)\.cross_attn\.out_proj\.weight", r"transformer.blocks.\1.cross_attn.to_out.weight"),
    (r"transformer\.layers\.(\d+)\.self_attn\.in_proj_weight", r"transformer.blocks.\1.self_attn.to_qkv.weight"),
    (r"transformer\.layers\.(\d+)\.self_attn\.out_proj\.weight", r"transformer.blocks.\1.self_attn.to_out.weight"),
    (r"transformer\.layers\.(\d+)\.mlp\.0\.(weight|bias)", r"transformer.blocks.\1.mlp.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.mlp\.3\.(weight|bias)", r"transformer.blocks.\1.mlp.fc2.\2"),
    (r"transformer\.norm\.(weight|bias)", r"transformer.norm.\1"),
    (r"transformer\.deconv\.(weight|bias)", r"transformer.upsample.\1"),
]
_RELEASED_DIRECT = [(re.compile(f"^{src}$"), dst) for src, dst in _RELEASED_DIRECT]
_RELEASED_DECODER = re.compile(r"^synthesizer\.decoder\.net\.(\d+)\.(weight|bias)$")
# nn.MultiheadAttention stores q/k/v fused when key and value widths equal the query width
_RELEASED_CROSS_FUSED = re.compile(r"^transformer\.layers\.(\d+)\.cross_attn\.in_proj_weight$")


def strip_released_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (e.g. `module.` from DDP, or a ported model's attribute name) if present."""
    anchors = [key for key in state if key.endswith(RELEASED_ANCHOR)]
    if len(anchors) != 1:
        raise KeyError(
            f"not a VFusion3D LRM state dict: expected one key ending in {RELEASED_ANCHOR!r}, found {len(anchors)}"
        )
    prefix = anchors[0][: -len(RELEASED_ANCHOR)]
    if not prefix:
        return state
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def is_released_state_dict(state: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(RELEASED_ANCHOR) for key in state)


def convert_released_lrm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released VFusion3D LRM state dict -> our LRM state dict (tensors shared, not copied)."""
    state = strip_released_prefix(state)
    encoder_prefix = "encoder.model."
    encoder_state = {k[len(encoder_prefix):]: v for k, v in state.items() if k.startswith(encoder_prefix)}
    out = {f"encoder.vit.{k}": v for k, v in hf_dinov2_to_timm(encoder_state).items()}
    unknown = []
    for key, value in state.items():
        if key.startswith(encoder_prefix) or key in IGNORED_RELEASED_KEYS:
            continue
        for pattern, target in _RELEASED_DIRECT:
            if pattern.match(key):
                out[pattern.sub(target, key)] = value
                break
        else:
            decoder = _RELEASED_DECODER.match(key)
            fused = _RELEASED_CROSS_FUSED.match(key)
            if decoder and int(decoder.group(1)) % 2 == 0:
                # nn.Sequential(Linear, ReLU, Linear, ...): linear layers sit at even indices
                out[f"decoder.layers.{int(decoder.group(1)) // 2}.{decoder.group(2)}"] = value
            elif fused:
                q, k, v = value.chunk(3, dim=0)
                prefix = f"transformer.blocks.{fused.group(1)}.cross_attn"
                out.update({f"{prefix}.to_q.weight": q, f"{prefix}.to_k.weight": k, f"{prefix}.to_v.weight": v})
            else:
                unknown.append(key)
    if unknown:
        raise KeyError(f"unrecognised VFusion3D parameter names (first 10 of {len(unknown)}): {unknown[:10]}")
    return out
