"""A Llama model made of plain torch modules, for GGUF blocks to fill: no transformers config or model code.

Importing transformers' Llama config and model pulls in `torch.distributed.tensor`, sympy and
`torch._dynamo` (~1.5 s of a replica's ~4.5 s start on a 2-core machine). A model served by the GGUF
block kernels needs none of it: its products are `gguf_blocks.BlockLinear`, its layers run in
`llama_layers.EagerLayers` and `llama_runner.LlamaRunner`. This module gives those the attributes they
read (the names transformers' Llama uses), with the same arithmetic where a module computes itself:
the RMSNorm and rotary tables are those of `LlamaRMSNorm` and `LlamaRotaryEmbedding` (default RoPE).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from gridserve.common.errors import ModelLoadError
from gridserve.replica.llama_layers import rope


@dataclass
class LlamaShellConfig:
    """The fields of a Llama `config.json` the shell and the runner read."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaShellConfig":
        """From a Llama config's dict (config.json, or a transformers config's `to_dict()`). ModelLoadError
        for another model type, or RoPE scaling the shell does not compute (default RoPE only)."""
        if d.get("model_type") != "llama":
            raise ModelLoadError(f"gguf block weights are wired for Llama models only, not {d.get('model_type')!r}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ModelLoadError(f"RoPE type {rope.get('rope_type', rope.get('type'))!r} is not served by gguf blocks")
        try:
            heads = int(d["num_attention_heads"])
            return cls(hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
                       num_hidden_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
                       num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                       vocab_size=int(d["vocab_size"]),
                       head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
                       rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                       rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
                       max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                       hidden_act=d.get("hidden_act", "silu"),
                       tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                       bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                       pad_token_id=d.get("pad_token_id"), sliding_window=d.get("sliding_window"))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"the model's config lacks or mangles {e}") from None

    @classmethod
    def from_file(cls, path: Path) -> "LlamaShellConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def of(cls, cfg) -> "LlamaShellConfig":
        """This config itself, or one made from a transformers config."""
        return cfg if isinstance(cfg, cls) else cls.from_dict(cfg.to_dict())


class RMSNorm(torch.nn.Module):
    """LlamaRMSNorm's math: float32 variance, x * rsqrt(variance + eps), times the weight."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Rotary(torch.nn.Module):
    """cos and sin tables of default RoPE for positions [B, T]: [B, T, head_dim] each, in x's dtype."""

    def __init__(self, cfg: LlamaShellConfig):
        super().__init__()
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).to(torch.float) / cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** exponents), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # one product each
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


class Attention(torch.nn.Module):
    def __init__(self, cfg: LlamaShellConfig):
        super().__init__()
        self.scaling = cfg.head_dim ** -0.5
        self.q_proj = self.k_proj = self.v_proj = self.o_proj = None  # the builder sets them


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = self.up_proj = self.down_proj = None  # the builder sets them
        self.act_fn = torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Layer(torch.nn.Module):
    def __init__(self, cfg: LlamaShellConfig, attn_norm: torch.Tensor, ffn_norm: torch.Tensor):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg), MLP()
        self.input_layernorm = RMSNorm(attn_norm, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(ffn_norm, cfg.rms_norm_eps)


class LlamaShell(torch.nn.Module):
    """`model.model` (embed_tokens, layers, norm, rotary_emb), `lm_head`, `config`, `generation_config`:
    what the Llama runner reads. `forward(input_ids)` computes logits for whole sequences (causal, no
    cache), for checks; serving goes through the runner."""

    def __init__(self, cfg: LlamaShellConfig, norms: list[tuple[torch.Tensor, torch.Tensor]], final_norm: torch.Tensor):
        super().__init__()
        self.config = cfg
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(Layer(cfg, a, f) for a, f in norms)
        self.model.norm = RMSNorm(final_norm, cfg.rms_norm_eps)
        self.model.rotary_emb = Rotary(cfg)
        self.model.embed_tokens = None  # the builder sets it, and lm_head
        self.lm_head = None
        self.generation_config = SimpleNamespace(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                                 pad_token_id=cfg.pad_token_id)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        cfg, inner = self.config, self.model
        x = inner.embed_tokens(input_ids)
        batch, length = input_ids.shape
        cos, sin = inner.rotary_emb(x, torch.arange(length)[None].expand(batch, length))
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
        for layer in inner.layers:
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q, k, v = (p(h).view(batch, length, -1, cfg.head_dim).transpose(1, 2)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            o = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True,
                                               scale=attn.scaling, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(batch, length, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return SimpleNamespace(logits=self.lm_head(inner.norm(x)))
