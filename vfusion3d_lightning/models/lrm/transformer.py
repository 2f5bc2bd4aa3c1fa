"""Camera embedder and the camera-modulated transformer that turns image tokens into a triplane."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten
# what selective checkpointing keeps: the matrix products and attention, the work a recompute would repeat
_KEPT_OPS = {
    aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_block(block: nn.Module, *inputs: torch.Tensor, selective: bool = False) -> torch.Tensor:
    """block(*inputs), its activations recomputed in the backward pass: all of them, or (selective) only the
    elementwise work, keeping matrix products and attention outputs: less recompute, more memory."""
    if selective:
        # autocast caches the cast of a leaf that requires grad across blocks, so a block's recompute would cast
        # it once more than its forward did; a view is not a leaf
        inputs = tuple(t.view_as(t) if t.is_leaf and t.requires_grad else t for t in inputs)
        return checkpoint(block, *inputs, use_reentrant=False,
                          context_fn=lambda: create_selective_checkpoint_contexts(_keep_products))
    return checkpoint(block, *inputs, use_reentrant=False)


class CameraEmbedder(nn.Module):
    """Source camera vector (B, 16) -> modulation vector (B, D)."""

    def __init__(self, camera_dim: int, embed_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(camera_dim, embed_dim)
        self.fc2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(camera)))


class ModulatedLayerNorm(nn.Module):
    """adaLN: LayerNorm then x * (1 + scale) + shift, with shift and scale from the camera embedding."""

    def __init__(self, dim: int, mod_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.modulation = nn.Linear(mod_dim, 2 * dim)

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(mod)).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Lq, D), (B, Lk, D), (B, Lk, D) -> (B, Lq, D) multi-head attention through SDPA."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class CrossAttention(nn.Module):
    """Queries from triplane tokens, keys and values from image tokens; no biases (as released)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.to_out(_attend(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.to_out(_attend(q, k, v, self.heads))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ModulatedBlock(nn.Module):
    """Cross-attention, self-attention and MLP, each after a camera-modulated LayerNorm, each residual."""

    def __init__(self, dim: int, context_dim: int, mod_dim: int, heads: int, eps: float, mlp_ratio: float):
        super().__init__()
        self.norm_cross = ModulatedLayerNorm(dim, mod_dim, eps)
        self.cross_attn = CrossAttention(dim, context_dim, heads)
        self.norm_self = ModulatedLayerNorm(dim, mod_dim, eps)
        self.self_attn = SelfAttention(dim, heads)
        self.norm_mlp = ModulatedLayerNorm(dim, mod_dim, eps)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm_cross(x, mod), context)
        x = x + self.self_attn(self.norm_self(x, mod))
        return x + self.mlp(self.norm_mlp(x, mod))


class TriplaneTransformer(nn.Module):
    """Learned triplane tokens attend to image tokens -> planes (B, 3, C, 2*low_res, 2*low_res)."""

    def __init__(self, dim: int, context_dim: int, mod_dim: int, layers: int, heads: int, low_res: int,
                 triplane_dim: int, eps: float = 1e-6, mlp_ratio: float = 4.0):
        super().__init__()
        self.low_res = low_res
        self.pos_embed = nn.Parameter(torch.randn(1, 3 * low_res * low_res, dim) * dim**-0.5)
        self.blocks = nn.ModuleList(
            ModulatedBlock(dim, context_dim, mod_dim, heads, eps, mlp_ratio) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.upsample = nn.ConvTranspose2d(dim, triplane_dim, kernel_size=2, stride=2)
        self.gradient_checkpointing: bool | str = False  # False, True or "selective" (checkpoint_block)
        # under gradient_checkpointing, recompute only the first this many blocks and keep the rest's
        # activations (None: all): less recompute where a batch leaves memory over
        self.recompute_blocks: int | None = None

    def forward(self, image_tokens: torch.Tensor, camera_embedding: torch.Tensor) -> torch.Tensor:
        """image_tokens: (B, L, Dc); camera_embedding: (B, Dm) -> planes (B, 3, C, H, W)."""
        batch = image_tokens.shape[0]
        x = self.pos_embed.expand(batch, -1, -1)
        recomputed = len(self.blocks) if self.recompute_blocks is None else self.recompute_blocks
        for index, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled() and index < recomputed:
                x = checkpoint_block(block, x, image_tokens, camera_embedding,
                                     selective=self.gradient_checkpointing == "selective")
            else:
                x = block(x, image_tokens, camera_embedding)
        x = self.norm(x)
        r = self.low_res
        # tokens are ordered plane-major: (B, 3*r*r, D) -> (B*3, D, r, r) for one deconvolution call
        x = x.reshape(batch * 3, r, r, -1).permute(0, 3, 1, 2)
        planes = self.upsample(x)
        return planes.unflatten(0, (batch, 3))
