"""One request's side of the engine: its outputs, the collector that hands them to asyncio, its handle."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from gridserve.common.errors import GridserveError
from gridserve.replica.detok import IncrementalDetokenizer, StopMatcher
from gridserve.replica.request_params import SamplingOptions


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


class Sequence:
    """A request inside the engine: prompt, generated ids, sampler state and text pipeline.

    A resumed request (mid-stream failover) starts with `output_ids` = the ids another replica
    already streamed: they count as output, and `replay_resume` puts them through the text pipeline
    without emitting their text.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], opts: SamplingOptions, tokenizer,
                 loop: asyncio.AbstractEventLoop, resume_ids: list[int] | tuple[int, ...] = ()):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.opts = opts
        self.loop = loop
        self.collector = RequestOutputCollector()
        self.output_ids: list[int] = list(resume_ids)
        self.resume_tokens = len(self.output_ids)
        self.cancelled = False       # set from the event loop; the engine drops the row at its next step
        self.finished = False
        self.generator: torch.Generator | None = None  # set when admitted
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopMatcher(list(opts.stop))

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def context_ids(self) -> list[int]:
        """What the model has seen: the prompt, then every output id (resumed ones included)."""
        return self.prompt_ids + self.output_ids

    def replay_resume(self) -> bool:
        """Feed the resumed ids through detokenizer and stop matcher, discarding their text, so the
        pipeline holds back exactly what the first replica's did; False if they complete a stop string."""
        for token in self.output_ids[:self.resume_tokens]:
            self.stops.feed(self.detok.add(token))
        return not self.stops.stopped

    def emit(self, output: RequestOutput) -> None:
        """Hand one output to the event loop without blocking (any thread)."""
        deliver(self.loop, [(self.collector, output)])


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

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self._engine.abort(self._seq)
