"""The fake model: a word tokenizer and a runner that streams deterministic words at a set pace, no torch.

A `{"type": "fake", "tokens_per_second": N}` model source replaces only the model: the replica's
real engine (admission, cancel, resume, 429, health, Info) runs with it, so load and autoscaling
tests can start hundreds of replicas on one machine. Importing this module loads no ML library.
"""
from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass, field

from gridserve.common.model_config import ModelConfig

EOS_ID = 0
WORDS = ("<eos>", "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "runs",
         "to", "river", "where", "it", "finds", "small", "boat", "with", "red", "sail", "under", "bright",
         "moon", "while", "old", "owl", "sings", "softly", "about", "stars", "far", "away", "in", "quiet",
         "night", "so", "every", "tree", "listens", "until", "morning", "comes", "again", "cat", "sleeps",
         "on", "warm", "stone", "near", "garden", "gate", "bees", "hum", "among", "flowers", "wind", "carries",
         "their", "song", "across", "hills")


class FakeTokenizer:
    """Words to ids: a known word is its index in WORDS, any other word a stable hash into them.

    Decoding gives each word a leading space, so the engine's incremental detokenizer streams
    " word" per token. Pure Python: safe from any thread.
    """
    eos_token_id = EOS_ID
    chat_template = None

    def __len__(self) -> int:
        return len(WORDS)

    def encode(self, text: str) -> list[int]:
        index = {w: i for i, w in enumerate(WORDS)}
        return [index.get(w) or 1 + zlib.crc32(w.encode()) % (len(WORDS) - 1) for w in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(f" {WORDS[i]}" for i in ids if not (skip_special_tokens and i == EOS_ID))


def next_token(seq) -> int:
    """A fixed cycle through the words (never EOS), its start derived from the prompt: the same context
    always gets the same next token, so a resumed stream continues byte for byte."""
    start = zlib.crc32(" ".join(map(str, seq.prompt_ids)).encode())
    return 1 + (start + len(seq.output_ids)) % (len(WORDS) - 1)


class FakeRunner:
    """The model runner for a fake model: each decode step is paced to 1/tokens_per_second, so every
    stream gets tokens_per_second; a prefill waits prefill_delay_s. Rows hold no cache."""

    def __init__(self, tokens_per_second: float, prefill_delay_s: float = 0.0):
        self.interval = 1.0 / tokens_per_second
        self.prefill_delay_s = prefill_delay_s
        self.vocab_size = len(WORDS)
        self.rows: list = []
        self._last_step = 0.0

    def thread_setup(self, num_threads: int) -> int:
        return 0  # no torch

    def add(self, seqs: list) -> tuple[list, list[int]]:
        if self.prefill_delay_s:
            time.sleep(self.prefill_delay_s)
        self.rows.extend(seqs)
        for seq in seqs:
            seq.computed = len(seq.context_ids)
        return seqs, [next_token(s) for s in seqs]

    def decode(self) -> tuple[list, list[int]]:
        wait = self._last_step + self.interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._last_step = time.monotonic()
        rows = list(self.rows)
        return rows, [next_token(s) for s in rows]

    def drop_finished(self) -> None:
        self.rows = [s for s in self.rows if not s.finished]

    def reset(self) -> None:
        self.rows = []


@dataclass
class FakeLoaded:
    """What the engine and server need of a loaded model, for a fake source."""
    config: ModelConfig
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    device: str = "cpu"
    eos_token_ids: frozenset[int] = frozenset({EOS_ID})
    from_cache: bool = False
    load_seconds: float = 0.0
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def source(self) -> str:
        return self.config.source.describe()

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def render_chat(self, messages: list[tuple[str, str]]) -> tuple[str, bool]:
        return "".join(f"{r}: {c}\n" for r, c in messages) + "assistant:", False

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        return self.tokenizer.encode(self.render_chat(messages)[0])

    def make_runner(self, max_rows: int) -> FakeRunner:
        src = self.config.source
        return FakeRunner(src.tokens_per_second, src.prefill_delay_s)


def load_fake(config: ModelConfig) -> FakeLoaded:
    return FakeLoaded(config)
