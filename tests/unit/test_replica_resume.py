"""Mid-stream failover in the engine: a stream resumed from any split point continues it exactly, text included."""
from __future__ import annotations

import threading

import pytest

from gridserve.common.errors import InvalidRequest
from gridserve.replica.engine import Engine
from gridserve.common.request_contract import SamplingOptions

PROMPT = "The quick brown fox jumps over the lazy dog."
# With the tiny model's seed, greedy output for this prompt has a byte token (the start of a character)
# at token 18: the detokenizer holds it back until token 19 (checked by the test that uses it).
MULTIBYTE_PROMPT = "word8 日本"
NEVER = "\u2603\u2603"  # never in the tiny model's output: a stop string ending with it only ever half-matches


class LockstepEngine(Engine):
    """The real engine, waiting after each hand-off until the reader took it: every step is its own output."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.taken = threading.Semaphore(0)

    def _flush(self) -> None:
        handed = bool(self._pending)
        super()._flush()
        if handed:
            self.taken.acquire(timeout=5)


async def lockstep_outputs(engine: LockstepEngine, handle) -> list:
    outs = []
    async for out in handle.outputs():
        outs.append(out)
        engine.taken.release()
    return outs


@pytest.fixture(scope="module")
def engines(tiny_loaded):
    """(lockstep engine for the unbroken streams, plain engine for the resumed ones)."""
    lockstep, plain = LockstepEngine(tiny_loaded, num_threads=1), Engine(tiny_loaded, num_threads=1)
    lockstep.start()
    plain.start()
    yield lockstep, plain
    lockstep.stop()
    plain.stop()


async def outputs(handle) -> list:
    return [out async for out in handle.outputs()]


def joined(outs) -> tuple[str, list[int]]:
    return "".join(o.text for o in outs), [t for o in outs for t in o.token_ids]


async def check_every_split(engines, prompt_ids, **opts) -> tuple[str, list[int], list[tuple[int, str]]]:
    """Stream unbroken, then resume at every output boundary (what a failing-over proxy has): each
    resumed stream must complete the text and ids exactly, with the same finish and usage.
    Returns the whole text, the whole ids and [(tokens before the split, text the client had)]."""
    lockstep, plain = engines
    opts = SamplingOptions(**{"max_tokens": 32, **opts})
    outs = await lockstep_outputs(lockstep, lockstep.submit("whole", prompt_ids, opts))
    whole_text, whole_ids = joined(outs)
    finish = outs[-1].finish_reason
    splits, text, ids = [], "", []
    for out in outs[:-1]:
        text, ids = text + out.text, ids + out.token_ids
        resumed = await outputs(plain.submit("resumed", prompt_ids, opts, ids))
        rest_text, rest_ids = joined(resumed)
        assert text + rest_text == whole_text, f"split after {len(ids)} tokens"
        assert ids + rest_ids == whole_ids
        assert (resumed[-1].finish_reason, resumed[-1].completion_tokens) == (finish, len(whole_ids))
        splits.append((len(ids), text))
    assert len(splits) == len(whole_ids) - 1  # after every token: each step (the prefill too) is its own output
    return whole_text, whole_ids, splits


async def test_resuming_after_any_split_continues_the_greedy_stream_exactly(tiny_loaded, engines):
    text, ids, splits = await check_every_split(engines, tiny_loaded.encode_prompt(PROMPT))
    assert len(ids) == 32 and text == tiny_loaded.tokenizer.decode(ids)


async def test_a_character_split_across_tokens_comes_out_whole_after_resuming_inside_it(tiny_loaded, engines):
    text, ids, splits = await check_every_split(engines, tiny_loaded.encode_prompt(MULTIBYTE_PROMPT))
    inside = [(k, had) for k, had in splits if tiny_loaded.tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert [k for k, _ in inside] == [18]  # the first replica held those bytes back ...
    for k, had in inside:
        assert len(had) < len(tiny_loaded.tokenizer.decode(ids[:k]))  # ... and the client did not have them


async def test_text_held_back_as_a_possible_stop_string_comes_out_after_resuming(tiny_loaded, engines):
    ids = tiny_loaded.encode_prompt(PROMPT)
    plain_ids = joined(await outputs(engines[1].submit("w", ids, SamplingOptions(max_tokens=32))))[1]
    before = tiny_loaded.tokenizer.decode(plain_ids[:10])
    half = before[-2:] + NEVER  # its first two characters end the 10th token's text
    text, _, splits = await check_every_split(engines, ids, stop=(half,))
    assert text == tiny_loaded.tokenizer.decode(plain_ids)  # never matched: nothing lost
    assert (10, before[:-2]) in splits  # held back at the split, released by the resumed stream


async def test_a_stop_string_across_the_split_ends_the_resumed_stream_with_stop(tiny_loaded, engines):
    ids = tiny_loaded.encode_prompt(PROMPT)
    whole, plain_ids = joined(await outputs(engines[1].submit("w", ids, SamplingOptions(max_tokens=32))))
    stop = tiny_loaded.tokenizer.decode(plain_ids[:5])[-2:] + tiny_loaded.tokenizer.decode(plain_ids[5:6])[:2]
    assert whole.index(stop) == len(tiny_loaded.tokenizer.decode(plain_ids[:5])) - 2
    text, stopped_ids, splits = await check_every_split(engines, ids, stop=(stop,))
    assert text == whole[:whole.index(stop)] and stopped_ids == plain_ids[:6]
    assert splits[-1][0] == 5


async def test_resume_tokens_count_toward_max_tokens_and_usage_but_not_tokens_generated(tiny_loaded, engines):
    _, plain = engines
    ids = tiny_loaded.encode_prompt(PROMPT)
    whole = joined(await outputs(plain.submit("w", ids, SamplingOptions(max_tokens=8))))[1]
    generated = plain.stats().tokens_generated_total
    handle = plain.submit("r", ids, SamplingOptions(max_tokens=8), whole[:5])
    assert (handle.prompt_tokens, handle.resume_tokens) == (len(ids), 5)
    outs = await outputs(handle)
    assert joined(outs)[1] == whole[5:]
    assert (outs[-1].finish_reason, outs[-1].completion_tokens) == ("length", 8)
    assert plain.stats().tokens_generated_total - generated == 3


async def test_resume_tokens_fill_the_context_like_generated_ones(tiny_loaded, engines):
    _, plain = engines
    prompt = tiny_loaded.encode_prompt("word " * 400)[:248]  # context_length is 256
    whole = joined(await outputs(plain.submit("w", prompt, SamplingOptions(max_tokens=100))))[1]
    assert len(whole) == 8
    outs = await outputs(plain.submit("r", prompt, SamplingOptions(max_tokens=100), whole[:6]))
    assert joined(outs)[1] == whole[6:] and outs[-1].finish_reason == "length"


def bad_resumes(tiny_loaded) -> list[tuple[list[int], list[int], int, str]]:
    """(prompt ids, resume ids, max_tokens, message) the engine must refuse."""
    ids = tiny_loaded.encode_prompt(PROMPT)
    eos = min(tiny_loaded.eos_token_ids)
    return [
        (ids, [5, 49152], 32, r"resume_token_ids\[1\] = 49152 is not a token id .*0 to 49151"),
        (ids, [-1], 32, r"resume_token_ids\[0\] = -1 is not a token id"),
        (ids, [5, eos, 6], 32, rf"resume_token_ids\[1\] is the end-of-sequence token {eos}"),
        (ids[:6] * 40, [5] * 16, 128, r"\(240 tokens\) and resume_token_ids \(16\) are 256 tokens; .* 256"),
        (ids, [5] * 8, 8, "resume_token_ids has 8 tokens and max_tokens is 8: nothing is left to generate"),
    ]


@pytest.mark.parametrize("case", range(5))
async def test_bad_resume_ids_are_invalid_and_the_engine_goes_on(tiny_loaded, engines, case):
    _, plain = engines
    prompt, resume, max_tokens, message = bad_resumes(tiny_loaded)[case]
    with pytest.raises(InvalidRequest, match=message):
        plain.submit("bad", prompt, SamplingOptions(max_tokens=max_tokens), resume)
    assert joined(await outputs(plain.submit("ok", prompt[:10], SamplingOptions(max_tokens=2), [5])))[1]


async def test_resume_ids_that_already_complete_a_stop_string_are_invalid(tiny_loaded, engines):
    _, plain = engines
    ids = tiny_loaded.encode_prompt(PROMPT)
    whole = joined(await outputs(plain.submit("w", ids, SamplingOptions(max_tokens=12))))
    stop = whole[0][3:7]
    stopped = joined(await outputs(plain.submit("s", ids, SamplingOptions(max_tokens=12, stop=(stop,)))))[1]
    with pytest.raises(InvalidRequest, match="already complete a stop string"):
        await outputs(plain.submit("r", ids, SamplingOptions(max_tokens=12, stop=(stop,)), stopped))
