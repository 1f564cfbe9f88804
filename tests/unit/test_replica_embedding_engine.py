"""The embedding engine with a tiny random-weight BERT in-process: pooling, batching across requests, admission, cancel, stop."""
from __future__ import annotations

import asyncio

import pytest
import torch

from gridserve.common.errors import InvalidRequest, Overloaded, Unavailable
from gridserve.common.model_config import ModelConfig
from gridserve.replica.embedding_engine import EmbeddingEngine
from gridserve.replica.embedding_model import LoadedEmbedder, mean_pool_normalize, pad_right

CONTEXT = 32


@pytest.fixture(scope="module")
def embedder() -> LoadedEmbedder:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64)).eval()
    config = ModelConfig.from_dict("bert", {"task": "embedding", "source": {"type": "local", "path": "/x"},
                                            "context_length": CONTEXT, "max_batch_size": 4, "max_waiting": 4})
    return LoadedEmbedder(config=config, model=model, tokenizer=SpaceTokenizer(), device=torch.device("cpu"),
                          source="test", dimensions=16)


class SpaceTokenizer:
    """A stand-in tokenizer: "1 5 9 2" is the ids [1, 5, 9, 2] (the engine only calls it with a list of texts)."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}


def text(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def alone(embedder, ids: list[int]) -> torch.Tensor:
    """The reference: one input, no padding, plain mean over its tokens, then unit length."""
    with torch.no_grad():
        hidden = embedder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def test_mean_pooling_ignores_padding_and_gives_unit_vectors():
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hidden_garbage = hidden.clone()
    hidden_garbage[0, 3:] = 1e6  # what padding positions hold must not matter
    out = mean_pool_normalize(hidden_garbage, mask)
    expected = torch.nn.functional.normalize(hidden[0, :3].mean(dim=0), dim=0)
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-6)


def test_pad_right_masks_the_padding():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


async def test_requests_queued_together_share_one_pass_and_equal_each_embedded_alone(embedder):
    engine = EmbeddingEngine(embedder)
    rows = [[1, 5, 9, 2], [1, 7, 2], [1, 3, 3, 3, 3, 3, 2]]
    handles = [engine.submit(f"r{i}", [text(r)]) for i, r in enumerate(rows)]  # before start: all queued
    engine.start()
    try:
        results = [await h.result() for h in handles]
        stats = engine.stats()
    finally:
        engine.stop()
    assert stats.steps_total == 1 and stats.mean_batch_size == 3 and stats.requests_total == 3
    for r, res in zip(rows, results):
        assert res.vectors.shape == (1, 16) and torch.allclose(res.vectors[0], alone(embedder, r), atol=1e-5)
    assert [res.prompt_tokens for res in results] == [4, 3, 7]


async def test_a_request_larger_than_a_pass_spans_passes_in_order(embedder):
    engine = EmbeddingEngine(embedder, max_batch_size=4)
    rows = [[1, i + 3, 2] for i in range(10)]
    engine.start()
    try:
        result = await engine.submit("big", [text(r) for r in rows]).result()  # alone on an idle engine: taken
        assert engine.stats().steps_total == 3                                    # whatever its size
        vectors = result.vectors
    finally:
        engine.stop()
    for r, v in zip(rows, vectors):
        assert torch.allclose(v, alone(embedder, r), atol=1e-5)


async def test_inputs_past_batch_and_queue_are_overloaded_and_bad_inputs_invalid(embedder):
    engine = EmbeddingEngine(embedder, max_batch_size=2, max_waiting=2)  # not started: everything stays queued
    engine.submit("a", ["1 2"] * 3)
    with pytest.raises(Overloaded, match="max_batch_size \\+ max_waiting = 4"):
        engine.submit("b", ["1 2"] * 2)
    engine.submit("c", ["1 2"])  # exactly full is fine
    with pytest.raises(InvalidRequest, match="no inputs"):
        engine.submit("e", [])
    with pytest.raises(InvalidRequest, match="input\\[1\\] is an empty string"):
        engine.submit("e", ["1", ""])
    assert engine.stats().waiting == 4


async def test_an_input_too_long_fails_its_request_alone(embedder):
    engine = EmbeddingEngine(embedder)
    long = engine.submit("long", ["1 2", text([1] * (CONTEXT + 1))])
    short = engine.submit("short", ["1 2 3"])  # shares the pass
    engine.start()
    try:
        with pytest.raises(InvalidRequest, match=f"input\\[1\\] is {CONTEXT + 1} tokens.*at most {CONTEXT}"):
            await long.result()
        assert torch.allclose((await short.result()).vectors[0], alone(embedder, [1, 2, 3]), atol=1e-5)
    finally:
        engine.stop()


async def test_a_cancelled_request_leaves_the_queue_and_stop_fails_the_rest_as_unavailable(embedder):
    engine = EmbeddingEngine(embedder)
    gone = engine.submit("gone", ["1 2 3"] * 3)
    kept = engine.submit("kept", ["1 2 3"])
    gone.cancel()
    assert engine.stats().waiting == 1
    engine.wedge()  # the thread runs but makes no passes
    engine.start()
    await asyncio.sleep(0.05)
    engine.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        await kept.result()
    with pytest.raises(asyncio.CancelledError):
        await gone.result()


def test_embedding_stats_carry_every_field_info_reads_from_a_generation_engine():
    """Info reads the same fields from either engine: an embedding replica's Info must not fail."""
    import dataclasses
    from gridserve.replica.embedding_engine import EmbeddingStats
    from gridserve.replica.engine import EngineStats
    missing = {f.name for f in dataclasses.fields(EngineStats)} - {f.name for f in dataclasses.fields(EmbeddingStats)}
    assert not missing, missing


async def test_an_embedding_engine_applies_a_new_thread_count_in_its_thread_while_idle(embedder):
    engine = EmbeddingEngine(embedder, num_threads=2)
    engine.start()
    try:
        for want in (2, 1):
            engine.set_threads(want)
            for _ in range(200):
                if engine.stats().num_threads == want:
                    break
                await asyncio.sleep(0.02)
            assert engine.stats().num_threads == want
        result = await engine.submit("after", [text([1, 5, 9, 2])]).result()
        assert torch.allclose(result.vectors[0], alone(embedder, [1, 5, 9, 2]), atol=1e-5)
    finally:
        engine.stop()
