"""The Llama runner with the tiny model: in-place slot cache, prefix reuse, chunked prefill, and the generic runner."""
from __future__ import annotations

import asyncio

import pytest
import torch

from gridserve.replica.engine import Engine
from gridserve.replica.llama_runner import LlamaRunner
from gridserve.replica.model_runner import HFRunner
from gridserve.common.request_contract import SamplingOptions

SYSTEM = "You are a careful assistant. Answer briefly and truthfully, in plain English, without lists. " * 3


def reference(loaded, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        return loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


async def tokens(engine, ids, n: int, name: str = "t") -> list[int]:
    out = []
    async for o in engine.submit(name, ids, SamplingOptions(max_tokens=n)).outputs():
        out.extend(o.token_ids)
    return out


@pytest.fixture
def started():
    engines = []

    def start(engine: Engine) -> Engine:
        engine.start()
        engines.append(engine)
        return engine
    yield start
    for e in engines:
        e.stop()


async def test_requests_sharing_a_prefix_reuse_its_kv_and_get_their_solo_output(tiny_loaded, started):
    engine = started(Engine(tiny_loaded, max_batch_size=4))
    assert isinstance(engine.runner, LlamaRunner)
    a = tiny_loaded.encode_prompt(SYSTEM + "What is the capital of France?")
    b = tiny_loaded.encode_prompt(SYSTEM + "Name a large ocean.")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 40
    assert await tokens(engine, a, 12) == reference(tiny_loaded, a, 12)
    before = engine.stats()
    assert await tokens(engine, b, 12) == reference(tiny_loaded, b, 12)
    after = engine.stats()
    assert after.prompt_tokens_cached_total - before.prompt_tokens_cached_total == shared
    assert after.prompt_tokens_prefilled_total - before.prompt_tokens_prefilled_total == len(b) - shared
    # a running row is a prefix source too, and its own stream is undisturbed
    both = await asyncio.gather(tokens(engine, a + [5, 6], 12, "x"), tokens(engine, a + [7], 12, "y"))
    assert both == [reference(tiny_loaded, a + [5, 6], 12), reference(tiny_loaded, a + [7], 12)]


async def test_the_cache_is_written_in_place_as_rows_join_and_leave(tiny_loaded, started):
    engine = started(Engine(tiny_loaded, max_batch_size=3))
    pointers = [t.data_ptr() for t in engine.runner.cache.k + engine.runner.cache.v]
    ids = [tiny_loaded.encode_prompt(f"Row {i} starts here") for i in range(5)]
    outs = await asyncio.gather(*(tokens(engine, p, 6 + 3 * i, f"r{i}") for i, p in enumerate(ids)))
    assert outs == [reference(tiny_loaded, p, 6 + 3 * i) for i, p in enumerate(ids)]
    assert [t.data_ptr() for t in engine.runner.cache.k + engine.runner.cache.v] == pointers


async def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_keep_decoding(tiny_loaded, started):
    engine = started(Engine(tiny_loaded, max_batch_size=2))
    engine.runner.prefill_chunk = 16
    short = tiny_loaded.encode_prompt("Once upon a time")
    long = tiny_loaded.encode_prompt(" ".join(f"word{i}" for i in range(60)))
    assert len(long) > 6 * 16
    steps_per_token = []
    seen = engine.steps_total

    async def running():
        nonlocal seen
        out = []
        async for o in engine.submit("short", short, SamplingOptions(max_tokens=40)).outputs():
            out.extend(o.token_ids)
            steps_per_token.append((engine.steps_total - seen) / max(1, len(o.token_ids)))
            seen = engine.steps_total
        return out

    task = asyncio.create_task(running())
    while engine.stats().tokens_generated_total < 3:
        await asyncio.sleep(0.001)
    long_out = await tokens(engine, long, 5, "long")
    short_out = await task
    assert short_out == reference(tiny_loaded, short, 40) and long_out == reference(tiny_loaded, long, 5)
    assert max(steps_per_token[1:]) <= 1.5  # a token in (about) every step: never a step it sat out


async def test_the_generic_runner_still_matches_generate_while_requests_join_and_leave(tiny_loaded, started):
    engine = started(Engine(tiny_loaded, max_batch_size=4, runner=HFRunner(tiny_loaded.model, tiny_loaded.device)))
    ids = [tiny_loaded.encode_prompt(f"Item number {i} is") for i in range(4)]
    outs = await asyncio.gather(*(tokens(engine, p, 5 + 4 * i, f"g{i}") for i, p in enumerate(ids)))
    assert outs == [reference(tiny_loaded, p, 5 + 4 * i) for i, p in enumerate(ids)]


def test_the_slot_cache_takes_memory_only_for_the_positions_written():
    import psutil
    from gridserve.replica.llama_runner import _lazy_zeros
    proc = psutil.Process()
    before = proc.memory_info().rss
    cache = _lazy_zeros((16, 4, 2048, 64), torch.float32, torch.device("cpu"))  # 32 MiB reserved
    cache[:, :, 0] = 1.0  # one position of every slot and head: 64 blocks of 512 KiB each touched once
    grown = proc.memory_info().rss - before
    assert cache.sum() == 16 * 4 * 64 and cache[:, :, 1:].abs().sum() == 0
    assert grown < 8 * 2**20, f"{grown / 2**20:.1f} MiB resident for 64 written rows of 256 bytes"  # huge pages: 32 MiB
