"""The generation engine: owns the model in its own thread and streams each request's text to asyncio."""
from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

from gridserve.common.errors import GridserveError, InvalidRequest, Overloaded, Unavailable
from gridserve.common.logs import event
from gridserve.replica.detok import IncrementalDetokenizer, StopMatcher
from gridserve.replica.loader import LoadedModel
from gridserve.replica.params import SamplingOptions

log = logging.getLogger("gridserve.replica.engine")
RATE_WINDOW_S = 5.0


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
    """A request inside the engine: its ids, KV cache, sampler state and text pipeline."""

    def __init__(self, request_id: str, prompt_ids: list[int], opts: SamplingOptions, engine: "Engine",
                 loop: asyncio.AbstractEventLoop, collector: RequestOutputCollector):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.opts = opts
        self.loop = loop
        self.collector = collector
        self.output_ids: list[int] = []
        self.cache = None            # the KV cache after the first forward
        self.next_input: list[int] = prompt_ids
        self.cancelled = False       # set from the event loop; checked by the engine every step
        self.finished = False
        self.generator: torch.Generator | None = None
        self.detok = IncrementalDetokenizer(engine.tokenizer, prompt_ids)
        self.stops = StopMatcher(list(opts.stop))

    def emit(self, output: RequestOutput) -> None:
        """Hand an output to the event loop without blocking (engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.collector.put, output)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class RequestHandle:
    """The asyncio side of one request: iterate `outputs()`, call `cancel()` when the caller goes away."""

    def __init__(self, engine: "Engine", seq: Sequence):
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request_id
        self.prompt_tokens = len(seq.prompt_ids)
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


@dataclass
class EngineStats:
    running: int
    waiting: int
    requests_total: int
    tokens_generated_total: int
    tokens_per_second: float
    rss_bytes: int


def sample_token(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits: greedy at temperature 0, else top-k/top-p sampling."""
    logits = logits.float()
    if opts.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / opts.temperature
    if 0 < opts.top_k < logits.numel():
        kth = torch.topk(logits, opts.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) > opts.top_p  # always keeps the top token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Engine:
    """Runs generation for one loaded model in a dedicated thread.

    The asyncio side calls `submit` and reads the returned `RequestHandle`; the engine thread runs
    steps. A step gives every running request one more token (`_step`: forward, sample, detokenize,
    emit) and admits waiting requests between steps. Today each running request gets its own
    forward pass with its own KV cache; a batched forward can replace `_forward`/`_step` without
    changing the queueing, cancellation or output side.
    """

    def __init__(self, loaded: LoadedModel, num_threads: int = 1, max_running: int | None = None,
                 max_waiting: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.context_length = loaded.config.context_length
        self.max_running = max_running or loaded.config.max_batch_size
        self.max_waiting = loaded.config.max_waiting if max_waiting is None else max_waiting
        self.num_threads = num_threads
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.requests_total = 0
        self.tokens_generated_total = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._proc = psutil.Process()
        # transformers 5.x renamed forward(past_key_values=) to cache=; use whichever this model takes.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ---- asyncio side -------------------------------------------------------------------

    def start(self) -> None:
        torch.set_num_threads(self.num_threads)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything (finish_reason "abort"), end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request_id: str, prompt_ids: list[int], opts: SamplingOptions) -> RequestHandle:
        """Queue a request (call on the event loop). Overloaded when running + waiting are full."""
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty after tokenization")
        if len(prompt_ids) >= self.context_length:
            raise InvalidRequest(f"the prompt is {len(prompt_ids)} tokens; it must be shorter than the "
                                 f"context length of {self.context_length} tokens")
        loop = asyncio.get_running_loop()
        seq = Sequence(request_id or f"engine-{next(self._ids)}", list(prompt_ids), opts, self, loop,
                       RequestOutputCollector())
        with self._cv:
            if self._stopping:
                raise Unavailable("the replica is shutting down")
            running = sum(not s.cancelled for s in self._running)  # a cancelled one's slot is free already
            if running + len(self._waiting) >= self.max_running + self.max_waiting:
                raise Overloaded(f"replica is full: {running} running, {len(self._waiting)} "
                                 f"waiting (max_waiting={self.max_waiting})")
            self._waiting.append(seq)
            self.requests_total += 1
            self._cv.notify_all()
        return RequestHandle(self, seq)

    def abort(self, seq: Sequence) -> None:
        """Cancel a request: a waiting one leaves the queue now, a running one at the next step."""
        with self._cv:
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                seq.finished = True
                seq.emit(RequestOutput(finish_reason="abort"))
            self._cv.notify_all()

    def stats(self) -> EngineStats:
        with self._cv:
            running, waiting = len(self._running), len(self._waiting)
            now = time.monotonic()
            recent = [(t, n) for t, n in self._recent if now - t <= RATE_WINDOW_S]
        span = min(RATE_WINDOW_S, max(1.0, now - recent[0][0])) if recent else 1.0
        return EngineStats(running=running, waiting=waiting, requests_total=self.requests_total,
                           tokens_generated_total=self.tokens_generated_total,
                           tokens_per_second=sum(n for _, n in recent) / span,
                           rss_bytes=self._proc.memory_info().rss)

    # ---- engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.num_threads)
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stopping:
                    break
                self._admit()
            try:
                self._step()
            except Exception as e:  # a bug outside one request's forward: fail the step's requests, go on
                event(log, "engine_step_failed", logging.ERROR, error=repr(e)[:300])
                for seq in list(self._running):
                    self._finish(seq, error=EngineError(f"generation failed: {e}"))
        with self._cv:
            leftover = list(self._waiting) + list(self._running)
            self._waiting.clear()
        for seq in leftover:
            self._finish(seq, "abort")

    def _admit(self) -> None:
        """Move waiting requests into free running slots (holding the lock)."""
        while self._waiting and len(self._running) < self.max_running:
            seq = self._waiting.popleft()
            if seq.opts.seed is not None:
                seq.generator = torch.Generator(device=self.device)
                seq.generator.manual_seed(seq.opts.seed)
            elif seq.opts.temperature > 0:
                seq.generator = torch.Generator(device=self.device)
                seq.generator.seed()
            self._running.append(seq)

    @torch.inference_mode()
    def _step(self) -> None:
        """One token for every running request; finished and cancelled ones leave at once."""
        for seq in list(self._running):
            if seq.cancelled:
                self._finish(seq, "abort")
                continue
            try:
                logits = self._forward(seq)
                token = sample_token(logits, seq.opts, seq.generator)
            except Exception as e:
                event(log, "request_step_failed", logging.ERROR, request_id=seq.request_id, error=repr(e)[:300])
                self._finish(seq, error=EngineError(f"generation failed: {type(e).__name__}: {e}"))
                continue
            self._append(seq, token)

    def _forward(self, seq: Sequence) -> torch.Tensor:
        """Prefill (first call) or one decode step with the request's KV cache; logits of the last position."""
        ids = torch.tensor([seq.next_input], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: seq.cache})
        seq.cache = out[self._cache_kw]
        return out.logits[0, -1]

    def _append(self, seq: Sequence, token: int) -> None:
        """Record a sampled token, turn it into text, decide whether the request is done, emit."""
        seq.output_ids.append(token)
        seq.next_input = [token]
        self._count_tokens(1)
        n = len(seq.output_ids)
        text, stopped = seq.stops.feed(seq.detok.add(token))
        reason = "stop" if stopped or token in self.loaded.eos_token_ids else None
        if reason is None and (n >= seq.opts.max_tokens or len(seq.prompt_ids) + n >= self.context_length):
            reason = "length"
        if reason is not None and not stopped:  # release what was held back, unless it completes a stop
            tail, stopped = seq.stops.feed(seq.detok.flush())
            text += tail + seq.stops.flush()
            reason = "stop" if stopped else reason
        if reason is None:
            seq.emit(RequestOutput(text=text, token_ids=[token], completion_tokens=n))
        else:
            self._finish(seq, reason, last=RequestOutput(text=text, token_ids=[token]))

    def _count_tokens(self, n: int) -> None:
        self.tokens_generated_total += n
        now = time.monotonic()
        with self._cv:
            self._recent.append((now, n))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()

    def _finish(self, seq: Sequence, reason: str | None = None, error: GridserveError | None = None,
                last: RequestOutput | None = None) -> None:
        """Remove a request at once (its KV cache with it) and send its final output."""
        with self._cv:
            if seq in self._running:
                self._running.remove(seq)
            self._cv.notify_all()
        if seq.finished:
            return
        seq.finished = True
        seq.cache = None
        out = last or RequestOutput()
        out.finish_reason, out.error, out.completion_tokens = reason, error, len(seq.output_ids)
        seq.emit(out)
