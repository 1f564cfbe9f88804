"""A request's state inside the engine: prompt, generated ids, where it stands in the KV cache, text pipeline."""
from __future__ import annotations

import asyncio

from gridserve.replica.detok import IncrementalDetokenizer, StopMatcher
from gridserve.replica.outputs import RequestOutput, RequestOutputCollector, deliver
from gridserve.common.request_contract import SamplingOptions


class Sequence:
    """A request inside the engine: prompt, generated ids, sampler state and text pipeline.

    A resumed request (mid-stream failover) starts with `output_ids` = the ids another replica
    already streamed: they count as output, and `replay_resume` puts them through the text pipeline
    without emitting their text. `computed` counts the context tokens whose keys and values the model
    runner holds (prefix-cache hits and prefilled chunks); the runner owns `slot` and `generator`.
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
        self.generator = None        # the runner's random stream for this request, set when admitted
        self.slot: int | None = None  # the runner's cache row, while it holds one
        self.computed = 0            # context tokens already in the runner's cache
        self.cached_tokens = 0       # of those, how many came from the prefix cache
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
