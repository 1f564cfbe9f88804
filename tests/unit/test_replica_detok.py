"""Incremental detokenization and stop-string matching, with the real SmolLM2 tokenizer."""
from __future__ import annotations

import pytest

from gridserve.replica.detok import REPLACEMENT_CHAR, IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """SmolLM2's tokenizer, as saved with the tiny model (tiny_model_dir: tests/conftest.py)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def stream(tokenizer, ids, prompt_ids=()):
    """Feed ids one by one; returns the deltas (flush included as the last one)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids))
    deltas = [detok.add(i) for i in ids]
    return deltas + [detok.flush()]


TEXTS = [
    "Hello world, plain ASCII.",
    " Hello  world  with   runs of spaces",
    "emoji 😀🎉 and more 🚀!",
    "CJK 你好世界 mixed with text",
    "naïve café — déjà vu",
    "line one\nline two\n\tindented",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_multibyte_characters_are_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("😀你", add_special_tokens=False)
    assert len(ids) > 2  # byte-level tokens: each character spans several ids
    deltas = stream(tokenizer, ids)
    assert "" in deltas[:-1]  # at least one token completed no character
    assert [d for d in deltas if d] == ["😀", "你"]


def test_leading_space_of_the_first_generated_token_is_kept(tokenizer):
    prompt = tokenizer.encode("The answer is", add_special_tokens=False)
    generated = tokenizer.encode(" forty two", add_special_tokens=False)
    deltas = stream(tokenizer, generated, prompt)
    assert deltas[0] == " forty"
    assert "".join(deltas) == " forty two"


def test_special_tokens_are_not_emitted(tokenizer):
    ids = tokenizer.encode("Hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, ids)) == "Hi"


def test_output_stopped_inside_a_character_is_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    deltas = stream(tokenizer, ids)
    assert "".join(deltas[:-1]) == "ok"  # the space shares a token with the emoji's first byte
    assert deltas[-1].startswith(" ") and deltas[-1].endswith(REPLACEMENT_CHAR)


def test_stop_string_split_over_tokens_is_found_and_not_emitted(tokenizer):
    ids = tokenizer.encode("alpha<END>omega", add_special_tokens=False)
    detok, stops = IncrementalDetokenizer(tokenizer, []), StopMatcher(["<END>"])
    emitted, stopped_at = [], None
    for n, i in enumerate(ids):
        text, stopped = stops.feed(detok.add(i))
        emitted.append(text)
        if stopped:
            stopped_at = n
            break
    assert "".join(emitted) == "alpha"
    assert tokenizer.decode(ids[stopped_at:stopped_at + 1]) == ">"  # found on the token that completed it
    assert len(ids[:stopped_at + 1]) > 3  # "<END>" really spanned several tokens


def test_stop_matcher_holds_back_only_possible_stop_prefixes():
    m = StopMatcher(["STOP"])
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)  # not a stop after all: released at once
    assert m.feed("yz") == ("yz", False)
    assert m.flush() == ""


def test_stop_matcher_releases_held_text_at_the_end():
    m = StopMatcher(["\n\n"])
    assert m.feed("done\n") == ("done", False)
    assert m.flush() == "\n"


def test_stop_matcher_earliest_of_several_stops_wins():
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hel") == ("he", False)  # "l" could start "lo w"
    assert m.feed("lo world") == ("l", True)  # "hel" in all: cut before "lo w", not "world"
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_stop_matcher_stop_in_one_piece_and_without_stops():
    assert StopMatcher(["</s>"]).feed("answer</s>junk") == ("answer", True)
    assert StopMatcher([]).feed("anything") == ("anything", False)
