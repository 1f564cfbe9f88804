"""The dense parts of a Llama layer (norms, projections, RoPE, MLP, residuals) that the Llama runner calls."""
from __future__ import annotations

import torch


class EagerLayers:
    """Each layer's own modules, as transformers runs them. A seam: `bench/compile_decode.py` swaps in an
    inductor-compiled form to measure it (it did not win on CPU; see docs/performance.md)."""

    def __init__(self, model, heads: int, kv_heads: int, head_dim: int):
        self.layers = model.model.layers
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim

    def qkv(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values of layer i for the flattened tokens x [T, hidden], RoPE applied."""
        layer = self.layers[i]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(-1, self.heads, self.head_dim)
        k = attn.k_proj(h).view(-1, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(-1, self.kv_heads, self.head_dim)
        return rope(q, cos, sin), rope(k, cos, sin), v

    def finish(self, i: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Layer i's output: residual + o_proj(attention), then residual + MLP(norm)."""
        layer = self.layers[i]
        x = x + layer.self_attn.o_proj(attn_out)
        return x + layer.mlp(layer.post_attention_layernorm(x))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' Llama applies it (rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
