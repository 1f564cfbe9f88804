"""Tokens to outputs: text, stop and length checks per token, the collector that hands them to asyncio, the handle."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Callable

from gridserve.common.errors import GridserveError


class EngineError(GridserveError):
    """The model step failed for this request (maps to INTERNAL); the engine goes on serving others."""


@dataclass
class RequestOutput:
    """What a request produced since the last read; the final one has finish_reason set."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "abort"
    completion_tokens: int = 0
    error: GridserveError | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def merge(self, later: "RequestOutput") -> None:
        """Fold a later output into this unread one (the consumer was slower than the engine)."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        self.finish_reason = later.finish_reason or self.finish_reason
        self.completion_tokens = later.completion_tokens
        self.error = later.error or self.error


class RequestOutputCollector:
    """One per request, lives on the event loop: the engine puts, the handler awaits; puts coalesce."""

    def __init__(self) -> None:
        self._output: RequestOutput | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        if self._output is None:
            self._output = output
            self._ready.set()
        else:
            self._output.merge(output)

    async def get(self) -> RequestOutput:
        while self._output is None:
            await self._ready.wait()
        output, self._output = self._output, None
        self._ready.clear()
        return output


def deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestOutputCollector, RequestOutput]]) -> None:
    """Put many outputs on their collectors with one wake-up of the loop; nothing if the loop is closed."""
    def put_all() -> None:
        for collector, output in items:
            collector.put(output)
    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


class RequestHandle:
    """The asyncio side of one request: iterate `outputs()`, call `cancel()` when the caller goes away."""

    def __init__(self, engine, seq: Sequence):
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request_id
        self.prompt_tokens = len(seq.prompt_ids)
        self.resume_tokens = seq.resume_tokens
        self.done = False

    async def outputs(self):
        while not self.done:
            out = await self._seq.collector.get()
            if out.finished:
                self.done = True
            if out.error is not None:
                raise out.error
            yield out

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache (known once admitted)."""
        return self._seq.cached_tokens

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self._engine.abort(self._seq)


class OutputProcessor:
    """Engine thread only: turns each sampled token into a request's next output and hands a step's
    outputs to their event loops at once.

    The tokenizer is used here (detokenization) and by the server's encode calls in other threads;
    `tokenizer_lock` is held while a step's tokens are turned into text, so the two never overlap.
    `on_finish(seq)` frees the request's place in the scheduler.
    """

    def __init__(self, eos_token_ids: frozenset[int], context_length: int, tokenizer_lock: threading.Lock,
                 on_finish: Callable):
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length
        self.tokenizer_lock = tokenizer_lock
        self.on_finish = on_finish
        self.pending: list = []  # (sequence, RequestOutput) of this step
        self.tokens = 0          # tokens appended since the last `take_tokens`

    def append_all(self, rows: list, tokens: list[int]) -> None:
        """One sampled token per row, under the tokenizer lock."""
        with self.tokenizer_lock:
            for seq, token in zip(rows, tokens):
                self.append(seq, token)

    def append(self, seq, token: int) -> None:
        """Record a sampled token, turn it into text, decide whether the request is done, queue its output."""
        seq.output_ids.append(token)
        self.tokens += 1
        n = len(seq.output_ids)
        text, stopped = seq.stops.feed(seq.detok.add(token))
        reason = "stop" if stopped or token in self.eos_token_ids else None
        if reason is None and (n >= seq.opts.max_tokens or len(seq.prompt_ids) + n >= self.context_length):
            reason = "length"
        if reason is not None and not stopped:  # release what was held back, unless it completes a stop
            tail, stopped = seq.stops.feed(seq.detok.flush())
            text += tail + seq.stops.flush()
            reason = "stop" if stopped else reason
        if reason is None:
            self.pending.append((seq, RequestOutput(text=text, token_ids=[token], completion_tokens=n)))
        else:
            self.finish(seq, reason, last=RequestOutput(text=text, token_ids=[token]))

    def finish(self, seq, reason: str | None = None, error: GridserveError | None = None,
               last: RequestOutput | None = None) -> None:
        """Mark a request done, free its place, queue its final output; the runner drops its row."""
        self.on_finish(seq)
        if seq.finished:
            return
        seq.finished = True
        out = last or RequestOutput()
        out.finish_reason, out.error, out.completion_tokens = reason, error, len(seq.output_ids)
        self.pending.append((seq, out))

    def take_tokens(self) -> int:
        tokens, self.tokens = self.tokens, 0
        return tokens

    def flush(self) -> None:
        """Hand this step's outputs to their event loops, one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, out in self.pending:
            by_loop.setdefault(seq.loop, []).append((seq.collector, out))
        self.pending = []
        for loop, items in by_loop.items():
            deliver(loop, items)
