"""The engine with the tiny random-weight model in-process: exact greedy, sampling, stops, limits, cancel."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from gridserve.common.errors import InvalidRequest, Overloaded
from gridserve.replica.engine import Engine, EngineError
from gridserve.common.request_contract import SamplingOptions

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
async def make_engine(tiny_loaded):
    engines = []

    def make(**kw) -> Engine:
        engine = Engine(tiny_loaded, num_threads=1, **kw)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


async def collect(handle):
    """Everything a request streams: (text, token ids, finish_reason, number of outputs)."""
    text, ids, finish, n = "", [], None, 0
    async for out in handle.outputs():
        text, n = text + out.text, n + 1
        ids.extend(out.token_ids)
        finish = out.finish_reason or finish
    return text, ids, finish, n


async def run(engine, prompt_ids, **opts):
    return await collect(engine.submit("t", prompt_ids, SamplingOptions(**{"max_tokens": 24, **opts})))


async def test_greedy_output_equals_model_generate_token_for_token(tiny_loaded, make_engine):
    ids = tiny_loaded.encode_prompt(PROMPT)
    with torch.inference_mode():
        ref = tiny_loaded.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    text, out_ids, finish, n = await run(make_engine(), ids)
    assert out_ids == ref
    assert text == tiny_loaded.tokenizer.decode(ref, skip_special_tokens=True)
    assert finish == "length" and n > 1


async def test_chat_prompt_uses_the_chat_template(tiny_loaded):
    ids = tiny_loaded.encode_chat([("user", "hi")])
    assert tiny_loaded.tokenizer.decode(ids).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


async def test_stop_string_across_tokens_ends_the_request_before_it(tiny_loaded, make_engine):
    engine = make_engine()
    ids = tiny_loaded.encode_prompt(PROMPT)
    full, out_ids, _, _ = await run(engine, ids)
    # A stop string made of the end of the 5th token's text and the start of the 6th one's.
    before = tiny_loaded.tokenizer.decode(out_ids[:5])
    stop = (before[-2:] + tiny_loaded.tokenizer.decode(out_ids[5:6])[:2])
    assert len(stop) == 4 and stop in full
    text, stopped_ids, finish, _ = await run(engine, ids, stop=(stop,))
    assert finish == "stop"
    assert text == full[:full.index(stop)]
    assert stopped_ids == out_ids[:6]


async def test_same_seed_gives_the_same_sample_and_another_seed_differs(tiny_loaded, make_engine):
    engine = make_engine()
    ids = tiny_loaded.encode_prompt(PROMPT)
    a = await run(engine, ids, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    b = await run(engine, ids, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    c = await run(engine, ids, temperature=1.0, top_p=0.95, top_k=50, seed=8)
    assert a[1] == b[1]
    assert a[1] != c[1]


async def test_max_tokens_and_a_full_context_end_with_length(tiny_loaded, make_engine):
    engine = make_engine()
    _, out_ids, finish, _ = await run(engine, tiny_loaded.encode_prompt(PROMPT), max_tokens=5)
    assert (len(out_ids), finish) == (5, "length")
    long_prompt = tiny_loaded.encode_prompt("word " * 400)[:250]  # context_length is 256
    _, out_ids, finish, _ = await run(engine, long_prompt, max_tokens=100)
    assert (len(out_ids), finish) == (6, "length")
    with pytest.raises(InvalidRequest, match="256"):
        engine.submit("t", tiny_loaded.encode_prompt("word " * 400)[:256], SamplingOptions(max_tokens=1))


async def test_cancelling_a_running_request_frees_its_slot(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=1, max_waiting=0)
    ids = tiny_loaded.encode_prompt(PROMPT)
    first = engine.submit("a", ids, SamplingOptions(max_tokens=128))
    outputs = first.outputs()
    await outputs.__anext__()
    with pytest.raises(Overloaded):
        engine.submit("b", ids, SamplingOptions(max_tokens=4))
    first.cancel()
    second = engine.submit("b", ids, SamplingOptions(max_tokens=4))  # the slot is free at once
    _, out_ids, finish, _ = await collect(second)
    assert (len(out_ids), finish) == (4, "length")
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.tokens_generated_total < 128 + 4


async def test_queue_beyond_max_waiting_is_overloaded(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=1, max_waiting=1)
    ids = tiny_loaded.encode_prompt(PROMPT)
    running = engine.submit("a", ids, SamplingOptions(max_tokens=128))
    await running.outputs().__anext__()  # "a" holds the one running slot
    waiting = engine.submit("b", ids, SamplingOptions(max_tokens=4))
    with pytest.raises(Overloaded, match="max_waiting=1"):
        engine.submit("c", ids, SamplingOptions(max_tokens=4))
    waiting.cancel()  # leaves the queue at once
    assert engine.stats().waiting == 0
    running.cancel()
    assert (await collect(running))[2] in (None, "abort")


async def test_a_failing_request_does_not_disturb_another(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=2)
    ids = tiny_loaded.encode_prompt(PROMPT)
    bad = engine.submit("bad", [10**7], SamplingOptions(max_tokens=4))  # id outside the vocabulary
    good = engine.submit("good", ids, SamplingOptions(max_tokens=8))
    with pytest.raises(EngineError, match="generation failed"):
        await collect(bad)
    _, out_ids, finish, _ = await collect(good)
    assert (len(out_ids), finish) == (8, "length")
    assert (await run(engine, ids, max_tokens=2))[2] == "length"  # and the engine goes on


async def test_concurrent_requests_each_get_their_solo_output(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=4)
    prompts = [tiny_loaded.encode_prompt(p) for p in (PROMPT, "Once upon a time", "1, 2, 3,")]
    solo = [await run(engine, p) for p in prompts]
    together = await asyncio.gather(*(run(engine, p) for p in prompts))
    assert [t[1] for t in together] == [s[1] for s in solo]


async def test_stats_count_requests_and_tokens(tiny_loaded, make_engine):
    engine = make_engine()
    await run(engine, tiny_loaded.encode_prompt(PROMPT), max_tokens=3)
    stats = engine.stats()
    assert dataclasses.astuple(stats)[:4] == (0, 0, 1, 3)
    assert stats.tokens_per_second > 0 and stats.rss_bytes > 0


def solo_generate(tiny_loaded, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        return tiny_loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


async def test_rows_joining_and_leaving_at_different_steps_each_equal_solo_generate(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=4)
    prompts = [PROMPT, "Once upon a time", "1, 2, 3,", "A somewhat longer prompt, with several more words in it."]
    ids = [tiny_loaded.encode_prompt(p) for p in prompts]
    max_tokens = [40, 6, 20, 12]
    refs = [solo_generate(tiny_loaded, i, n) for i, n in zip(ids, max_tokens)]
    first = engine.submit("r0", ids[0], SamplingOptions(max_tokens=max_tokens[0]))
    later, got = [], []
    async for out in first.outputs():  # request k joins once the first one has streamed 5*k tokens
        got += out.token_ids
        while len(later) < 3 and len(got) >= 5 * (len(later) + 1):
            k = len(later) + 1
            handle = engine.submit(f"r{k}", ids[k], SamplingOptions(max_tokens=max_tokens[k]))
            later.append(asyncio.create_task(collect(handle)))
    results = [r[1] for r in await asyncio.gather(*later)]
    assert [got, *results] == refs
    assert engine.stats().steps_total < sum(len(r) for r in refs)  # rows shared forward passes


async def test_newcomers_arriving_together_share_prefill_and_every_step(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=8)
    ids = [tiny_loaded.encode_prompt(f"Item number {i} is") for i in range(6)]
    outs = await asyncio.gather(*(run(engine, i, max_tokens=10) for i in ids))
    assert all(len(o[1]) == 10 for o in outs)
    stats = engine.stats()
    assert stats.steps_total <= 10 + 2  # one prefill (maybe two: the first arrival alone) and a decode per token
    assert stats.mean_batch_size > 4


class StepProbe(Engine):
    """An engine that notes how many forward passes it had run when each request finished."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.finished_at_step: dict[str, int] = {}
        finish = self.outputs.finish

        def probe(seq, *args, **kw):
            self.finished_at_step.setdefault(seq.request_id, self.steps_total)
            finish(seq, *args, **kw)
        self.outputs.finish = probe


async def test_a_cancelled_row_leaves_the_batch_within_a_step_and_the_others_continue(tiny_loaded, make_engine):
    ids = [tiny_loaded.encode_prompt(PROMPT), tiny_loaded.encode_prompt("Once upon a time")]
    solo = await run(make_engine(), ids[1], max_tokens=60)
    engine = StepProbe(tiny_loaded, num_threads=1, max_batch_size=4)
    engine.start()
    try:
        doomed = engine.submit("doomed", ids[0], SamplingOptions(max_tokens=128))
        other = asyncio.create_task(run(engine, ids[1], max_tokens=60))
        await doomed.outputs().__anext__()
        while engine.stats().running < 2:
            await asyncio.sleep(0.001)
        steps_at_cancel = engine.steps_total
        doomed.cancel()
        assert (await other)[:3] == solo[:3]
        assert engine.finished_at_step["doomed"] - steps_at_cancel <= 1  # gone before the step after the one in flight
        assert engine.stats().tokens_generated_total < 128 + 60
    finally:
        engine.stop()


async def test_full_batch_and_full_queue_answer_overloaded_at_once(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=2, max_waiting=1)
    ids = tiny_loaded.encode_prompt(PROMPT)
    held = [engine.submit(f"h{i}", ids, SamplingOptions(max_tokens=128)) for i in range(3)]
    while (engine.stats().running, engine.stats().waiting) != (2, 1):
        await asyncio.sleep(0.001)
    with pytest.raises(Overloaded, match=r"2 running \(max_batch_size=2\), 1 waiting \(max_waiting=1\)"):
        engine.submit("late", ids, SamplingOptions(max_tokens=1))
    held[0].cancel()
    late = engine.submit("late", ids, SamplingOptions(max_tokens=1))  # the cancelled row's slot is free at once
    for h in held[1:]:
        h.cancel()
    assert (await collect(late))[2] == "length"


async def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=6)
    ids = tiny_loaded.encode_prompt(PROMPT)
    seeded = dict(temperature=0.9, top_p=0.95, top_k=100, seed=42, max_tokens=20)
    alone = await run(engine, ids, **seeded)
    company = [run(engine, tiny_loaded.encode_prompt("Once upon a time"), temperature=1.0, max_tokens=30),
               run(engine, tiny_loaded.encode_prompt("1, 2, 3,"), max_tokens=5),
               run(engine, ids, temperature=0.7, top_p=0.5, seed=1, max_tokens=25)]
    together = await asyncio.gather(*company[:2], run(engine, ids, **seeded), company[2])
    assert together[2][1] == alone[1]
    assert together[3][1] != alone[1]


async def test_a_stop_string_ends_its_row_and_the_batch_goes_on(tiny_loaded, make_engine):
    engine = make_engine(max_batch_size=4)
    ids = tiny_loaded.encode_prompt(PROMPT)
    full = await run(engine, ids, max_tokens=24)
    stop = full[0][len(full[0]) // 3:][:3]
    other_ids = tiny_loaded.encode_prompt("Once upon a time")
    other_solo = await run(engine, other_ids, max_tokens=24)
    stopped, other = await asyncio.gather(run(engine, ids, stop=(stop,)), run(engine, other_ids, max_tokens=24))
    assert stopped[2] == "stop" and stopped[0] == full[0][:full[0].index(stop)]
    assert other[:3] == other_solo[:3]
