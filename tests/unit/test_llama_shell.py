"""The plain-torch Llama the GGUF blocks fill: its config, and the same arithmetic as transformers' Llama."""
from __future__ import annotations

import pytest
import torch

from gridserve.common.errors import ModelLoadError
from gridserve.replica.llama_shell import LlamaShellConfig, RMSNorm, Rotary

pytestmark = pytest.mark.unit

BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512, "eos_token_id": 2}


def test_the_config_reads_rope_theta_from_either_place_and_defaults_the_head_size():
    new = LlamaShellConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    old = LlamaShellConfig.from_dict({**BASE, "rope_theta": 500000.0})
    assert (new.rope_theta, old.rope_theta) == (100000.0, 500000.0)
    assert new.head_dim == 16 and LlamaShellConfig.from_dict({**BASE, "head_dim": 32}).head_dim == 32


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "Llama models only, not 'mistral'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
    ({"hidden_size": None}, "lacks or mangles"),
])
def test_the_config_refuses_what_the_shell_does_not_compute(change, message):
    with pytest.raises(ModelLoadError, match=message):
        LlamaShellConfig.from_dict({**BASE, **change})


def test_the_rotary_tables_and_rms_norm_equal_transformers_llama_bit_for_bit():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding
    hf = LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, rope_theta=100000.0)
    shell = LlamaShellConfig.of(hf)
    x, positions = torch.randn(2, 7, 64), torch.arange(300).reshape(2, 150)
    for got, want in zip(Rotary(shell)(x, positions), LlamaRotaryEmbedding(config=hf)(x, positions)):
        assert torch.equal(got, want)
    weight = torch.randn(64)
    reference = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(weight)
    assert torch.equal(RMSNorm(weight, 1e-5)(x), reference(x))
