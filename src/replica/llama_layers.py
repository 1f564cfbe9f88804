"""The dense parts of a Llama layer (norms, projections, RoPE, MLP, residuals) that the Llama runner calls."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class EagerLayers:
    """Each layer's own modules, as transformers runs them. A seam: `bench/compile_decode.py` swaps in an
    inductor-compiled form to measure it (it did not win on CPU; see docs/performance.md)."""

    def __init__(self, model, heads: int, kv_heads: int, head_dim: int):
        self.layers = model.model.layers
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        norm = self.layers[0].input_layernorm
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        # The GGUF block kernels where they serve the model (float32 on CPU); the runner uses them too.
        kernels, weight = getattr(model, "gridserve_kernels", None), model.model.norm.weight
        self.kernels = kernels if weight.dtype == torch.float32 and weight.device.type == "cpu" else None
        # Every layer joined (q/k/v and gate/up each one product) and the kernels at hand: a layer is a
        # few kernel calls (`attention_input`, `mlp_delta`) instead of some forty torch operations.
        self.fused = self.kernels is not None and getattr(model.config, "hidden_act", None) == "silu" and all(
            getattr(layer.self_attn, "qkv_blocks", None) is not None
            and getattr(layer.mlp, "gate_up_blocks", None) is not None for layer in self.layers)

    def norm(self, module, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm as one call (LlamaRMSNorm's math, float32 in and out; each row alone)."""
        if self.kernels is not None:
            return self.kernels.rms_norm(x, module.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), module.weight, self.eps)

    def qkv(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values of layer i for the flattened tokens x [T, hidden], RoPE applied."""
        layer = self.layers[i]
        attn = layer.self_attn
        h = self.norm(layer.input_layernorm, x)
        fused = getattr(attn, "qkv_blocks", None)  # q, k and v in one product (gguf_blocks.build_model)
        if fused is not None:
            q, k, v = fused(h).split(self.sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.reshape(-1, self.heads, self.head_dim)
        k = k.reshape(-1, self.kv_heads, self.head_dim)
        v = v.reshape(-1, self.kv_heads, self.head_dim)
        return rope(q, cos, sin), rope(k, cos, sin), v

    def finish(self, i: int, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Layer i's output: residual + o_proj(attention), then residual + MLP(norm)."""
        layer = self.layers[i]
        x = x + layer.self_attn.o_proj(attn_out)
        h = self.norm(layer.post_attention_layernorm, x)
        mlp = layer.mlp
        fused = getattr(mlp, "gate_up_blocks", None)
        if fused is not None:
            gate, up = fused(h).chunk(2, dim=-1)
            return x + mlp.down_proj(mlp.act_fn(gate) * up)
        return x + mlp(h)

    def attention_input(self, i: int, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor,
                        sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, at: torch.Tensor,
                        prompt=None):
        """(Fused layers.) x += delta, the previous layer's MLP output, in place; then layer i's queries
        [T, heads, dim] with RoPE (cos, sin [T, dim]), its keys and values written to the caches at
        `at`. `prompt`: which tokens are prompt tokens (gguf_blocks.PromptRows), for the products."""
        layer = self.layers[i]
        h = self.kernels.rms_norm(x, layer.input_layernorm.weight, self.eps, add=delta)
        return self.kernels.rope_kv(layer.self_attn.qkv_blocks(h, prompt), self.heads, self.kv_heads, cos, sin,
                                    k_cache, v_cache, at)

    def mlp_delta(self, i: int, x: torch.Tensor, attn_out: torch.Tensor, prompt=None) -> torch.Tensor:
        """(Fused layers.) x += o_proj(attention) in place; the MLP's output, for the next layer to add."""
        layer = self.layers[i]
        h = self.kernels.rms_norm(x, layer.post_attention_layernorm.weight, self.eps,
                                  add=layer.self_attn.o_proj(attn_out, prompt))
        mlp = layer.mlp
        return mlp.down_proj(self.kernels.silu_mul(mlp.gate_up_blocks(h, prompt)), prompt)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' Llama applies it (rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
