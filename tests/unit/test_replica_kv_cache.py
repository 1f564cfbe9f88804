"""The left-padded batch KV cache with the tiny model: rows that join and leave keep their solo logits."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import MistralConfig

from gridserve.common.errors import ModelLoadError
from gridserve.replica.kv_cache import KVBatch, check_supported

# Each row's logits in the batch equal the logits of its sequence run alone, up to float32 rounding
# (padding changes the shapes the matrix kernels see); the random model's logits are O(10).
ATOL = 1e-4


def solo_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of one sequence run alone from scratch (no cache, no padding)."""
    return model(input_ids=torch.tensor([ids])).logits[0, -1]


@torch.inference_mode()
def test_rows_joining_and_leaving_keep_the_logits_they_get_alone(tiny_loaded):
    model = tiny_loaded.model
    seqs = [tiny_loaded.encode_prompt(p) for p in ("The quick brown fox jumps over the lazy dog.", "Hi", "1, 2, 3, 4,")]
    batch, rows = KVBatch(model, tiny_loaded.device), []

    def check(logits: torch.Tensor, these: list[list[int]]) -> None:
        """Each row's logits equal its solo logits; then the row takes its greedy token."""
        for row, seq in zip(logits, these):
            torch.testing.assert_close(row, solo_logits(model, seq), atol=ATOL, rtol=0)
            seq.append(int(row.argmax()))

    def decode(steps: int) -> None:
        for _ in range(steps):
            check(batch.decode([seq[-1] for seq in rows]), rows)

    rows += seqs[:2]
    check(batch.prefill(seqs[:2]), seqs[:2])  # two rows of different lengths, prefilled together
    decode(3)
    rows.append(seqs[2])
    check(batch.prefill([seqs[2]]), [seqs[2]])  # a newcomer joins the running batch
    decode(3)
    batch.keep([1, 2])  # the longest row leaves
    del rows[0]
    assert batch.length == max(len(s) for s in rows) - 1  # columns only its padding used are gone
    decode(3)
    assert len(batch) == 2


@torch.inference_mode()
def test_keep_nothing_empties_the_batch_and_it_can_start_again(tiny_loaded):
    batch = KVBatch(tiny_loaded.model, tiny_loaded.device)
    ids = tiny_loaded.encode_prompt("Hello there")
    batch.prefill([ids, ids])
    batch.keep([])
    assert (len(batch), batch.length) == (0, 0)
    logits = batch.prefill([ids])
    torch.testing.assert_close(logits[0], solo_logits(tiny_loaded.model, ids), atol=ATOL, rtol=0)


def test_a_model_with_sliding_window_layers_is_refused_clearly():
    config = MistralConfig(sliding_window=8, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    with pytest.raises(ModelLoadError, match="DynamicSlidingWindowLayer"):
        check_supported(SimpleNamespace(config=config))
