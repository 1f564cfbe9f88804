"""The continuous-batching engine: one thread ties admission, the model runner and output processing together."""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

from gridserve.common.errors import InvalidRequest
from gridserve.common.eventlog import event
from gridserve.replica.batch_scheduler import BatchScheduler
from gridserve.replica.openmp_team import release_openmp_threads
from gridserve.replica.outputs import EngineError, OutputProcessor, RequestHandle, RequestOutput
from gridserve.common.request_contract import SamplingOptions
from gridserve.replica.sequence import Sequence

__all__ = ["Engine", "EngineError", "EngineStats", "RequestHandle", "RequestOutput"]
log = logging.getLogger("gridserve.replica.engine")
RATE_WINDOW_S = 5.0
# Prompt tokens one step may prefill (at least one request is always admitted): bounds how long the
# running rows wait for newcomers' prefill.
PREFILL_TOKENS = 1024


@dataclass
class EngineStats:
    running: int              # rows in the batch (the batch size), newcomers being prefilled included
    waiting: int              # requests queued for a free row
    requests_total: int
    tokens_generated_total: int
    tokens_per_second: float  # over the last RATE_WINDOW_S seconds
    rss_bytes: int
    max_batch_size: int = 0
    max_waiting: int = 0
    steps_total: int = 0      # forward passes (batched prefills and decode steps)
    mean_batch_size: float = 0.0  # rows per forward pass over the last RATE_WINDOW_S seconds
    num_threads: int = 0      # torch intra-op threads the engine thread runs with
    seconds_since_step: float = 0.0  # with work: since the last finished step (or the work's arrival); 0 idle
    prompt_tokens_cached_total: int = 0     # prompt tokens whose KV came from the prefix cache
    prompt_tokens_prefilled_total: int = 0  # prompt tokens the model computed


class Engine:
    """Runs generation for one loaded model in a dedicated thread, continuously batched.

    Three parts, each in its own module: the `BatchScheduler` (admission, waiting and running
    requests, 429), the model runner (`loaded.make_runner`: weights, KV cache, forward, sampling)
    and the `OutputProcessor` (tokens to text, stops, limits, hand-off to asyncio). Each step drops
    cancelled rows, prefills newcomers, runs one decode forward for every row and removes finished
    rows at once; a step's outputs reach the event loop in one hand-off.

    If the thread itself dies, every open request fails at once with an EngineError, new ones are
    refused (Unavailable) and `on_dead(reason)` is called so the server can go NOT_SERVING.
    """

    def __init__(self, loaded, num_threads: int = 1, max_batch_size: int | None = None,
                 max_waiting: int | None = None, prefill_tokens: int = PREFILL_TOKENS, runner=None):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.context_length = loaded.config.context_length
        self.max_batch_size = max_batch_size or loaded.config.max_batch_size
        self.max_waiting = loaded.config.max_waiting if max_waiting is None else max_waiting
        self.num_threads = num_threads
        self.runner = runner or loaded.make_runner(self.max_batch_size)
        self.vocab_size = self.runner.vocab_size
        if getattr(self.runner, "prefill_chunk", 0):  # the runner chunks long prompts itself: admit into any free row
            prefill_tokens = 1 << 30
        self.scheduler = BatchScheduler(self.max_batch_size, self.max_waiting, prefill_tokens)
        self.outputs = OutputProcessor(loaded.eos_token_ids, self.context_length, loaded.tokenizer_lock,
                                       self.scheduler.release)
        self.on_dead: Callable[[str], None] | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.tokens_generated_total = 0
        self.steps_total = 0
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, tokens, rows)
        self._recent_lock = threading.Lock()
        self._proc = psutil.Process()
        self.torch_threads = 0  # what torch reports inside the engine thread, once it runs

    # ---- asyncio side -------------------------------------------------------------------

    def start(self) -> None:
        release_openmp_threads()  # the engine thread's team must be the only one (see there)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything (finish_reason "abort"), end the thread."""
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def set_threads(self, num_threads: int) -> None:
        """Run `num_threads` torch threads from the next step on (call from any thread). The engine
        thread applies it: torch's intra-op thread count belongs to the thread that runs the model."""
        self.num_threads = num_threads
        self.scheduler.poke()

    @property
    def dead(self) -> str:
        """Why the engine thread died ("" while it lives)."""
        return self.scheduler.dead

    @property
    def wedged(self) -> bool:
        return self.scheduler.wedged

    @property
    def requests_total(self) -> int:
        return self.scheduler.requests_total

    def submit(self, request_id: str, prompt_ids: list[int], opts: SamplingOptions,
               resume_ids: list[int] | tuple[int, ...] = ()) -> RequestHandle:
        """Queue a request (call on the event loop). Overloaded at once when every row and queue place is taken.

        `resume_ids`: a stream another replica began (mid-stream failover); generation continues after them.
        """
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty after tokenization")
        if len(prompt_ids) >= self.context_length:
            raise InvalidRequest(f"the prompt is {len(prompt_ids)} tokens; it must be shorter than the "
                                 f"context length of {self.context_length} tokens")
        if resume_ids:
            self._check_resume(len(prompt_ids), resume_ids, opts)
        seq = Sequence(request_id or f"engine-{next(self._ids)}", list(prompt_ids), opts, self.tokenizer,
                       asyncio.get_running_loop(), resume_ids)
        self.scheduler.submit(seq)
        return RequestHandle(self, seq)

    def _check_resume(self, prompt_tokens: int, resume_ids, opts: SamplingOptions) -> None:
        """InvalidRequest unless the resumed ids are real token ids that leave something to generate."""
        bad = next((i for i, t in enumerate(resume_ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"resume_token_ids[{bad}] = {resume_ids[bad]} is not a token id of this model "
                                 f"(the vocabulary has {self.vocab_size} ids, 0 to {self.vocab_size - 1})")
        eos = next((i for i, t in enumerate(resume_ids) if t in self.loaded.eos_token_ids), None)
        if eos is not None:
            raise InvalidRequest(f"resume_token_ids[{eos}] is the end-of-sequence token {resume_ids[eos]}: "
                                 f"a stream that ended there has nothing left to generate")
        total = prompt_tokens + len(resume_ids)
        if total >= self.context_length:
            raise InvalidRequest(f"the prompt ({prompt_tokens} tokens) and resume_token_ids ({len(resume_ids)}) "
                                 f"are {total} tokens; together they must be shorter than the context length "
                                 f"of {self.context_length} tokens")
        if len(resume_ids) >= opts.max_tokens:
            raise InvalidRequest(f"resume_token_ids has {len(resume_ids)} tokens and max_tokens is "
                                 f"{opts.max_tokens}: nothing is left to generate")

    def wedge(self, on: bool = True) -> None:
        """Fault injection (tests only): while wedged the engine thread makes no steps, like a hung
        kernel or a deadlock; requests are still accepted and queue up."""
        self.scheduler.wedge(on)

    def abort(self, seq: Sequence) -> None:
        """Cancel a request: a waiting one leaves the queue now, a running one at the next step."""
        self.scheduler.abort(seq)

    def stats(self) -> EngineStats:
        running, waiting, since_step = self.scheduler.counts()
        now = time.monotonic()
        with self._recent_lock:
            recent = [r for r in self._recent if now - r[0] <= RATE_WINDOW_S]
        span = min(RATE_WINDOW_S, max(1.0, now - recent[0][0])) if recent else 1.0
        cache = getattr(self.runner, "prompt_tokens", None)
        return EngineStats(running=running, waiting=waiting, requests_total=self.requests_total,
                           tokens_generated_total=self.tokens_generated_total,
                           tokens_per_second=sum(r[1] for r in recent) / span,
                           rss_bytes=self._proc.memory_info().rss, max_batch_size=self.max_batch_size,
                           max_waiting=self.max_waiting, steps_total=self.steps_total,
                           mean_batch_size=sum(r[2] for r in recent) / len(recent) if recent else 0.0,
                           num_threads=self.torch_threads, seconds_since_step=since_step,
                           prompt_tokens_cached_total=cache.cached if cache else 0,
                           prompt_tokens_prefilled_total=cache.prefilled if cache else 0)

    # ---- engine thread: the loop --------------------------------------------------------

    def _run(self) -> None:
        try:
            applied = self.num_threads
            self.torch_threads = self.runner.thread_setup(applied)
            while self.scheduler.wait_for_work():
                if self.num_threads != applied:
                    applied = self.num_threads
                    self.torch_threads = self.runner.thread_setup(applied)
                    event(log, "engine_threads", num_threads=self.torch_threads)
                self._guarded_step(self.scheduler.admit())
                self.scheduler.stepped()
                self._flush()
            for seq in self.scheduler.take_all():
                self.outputs.finish(seq, "abort")
            self._flush()
        except BaseException as e:  # noqa: BLE001 - the thread is dying: fail every request, say so
            self._die(e)

    def _guarded_step(self, admitted: list[Sequence]) -> None:
        try:
            self._step(admitted)
        except Exception as e:  # the batched forward failed: every row fails, the engine goes on
            event(log, "engine_step_failed", logging.ERROR, rows=len(self.runner.rows), error=repr(e)[:300])
            for seq in self.runner.rows + admitted:
                self.outputs.finish(seq, error=EngineError(f"generation failed: {type(e).__name__}: {e}"))
            self.runner.reset()

    def _die(self, e: BaseException) -> None:
        """The engine thread cannot go on: every open request fails now, new ones are refused."""
        reason = f"{type(e).__name__}: {e}"[:300]
        event(log, "engine_died", logging.ERROR, error=reason)
        error = EngineError(f"the replica's engine thread died ({reason}); retry on another replica")
        for seq in self.scheduler.take_all(dead=reason):
            self.outputs.finish(seq, error=error)
        self._flush()
        if self.on_dead is not None:
            self.on_dead(reason)

    def _step(self, admitted: list[Sequence]) -> None:
        """Drop cancelled rows, prefill newcomers into the batch, then one token for every row."""
        for seq in self.runner.rows + admitted:
            if seq.cancelled:
                self.outputs.finish(seq, "abort")
        self.runner.drop_finished()
        newcomers = [s for s in admitted if not s.finished and self._replay(s)]
        if newcomers:
            self._prefill(newcomers)
        if self.runner.rows:
            forward_rows = len(self.runner.rows)
            self._emit(*self.runner.decode(), forward_rows=forward_rows)
            self.runner.drop_finished()

    def _replay(self, seq: Sequence) -> bool:
        """Bring a resumed request's text pipeline to where the first replica's was; False if that ends it."""
        if not seq.resume_tokens:
            return True
        with self.loaded.tokenizer_lock:
            ok = seq.replay_resume()
        if not ok:
            self.outputs.finish(seq, error=InvalidRequest("resume_token_ids already complete a stop string: "
                                                          "nothing is left to generate"))
        return ok

    def _prefill(self, group: list[Sequence]) -> None:
        """Prefill a group as one batch; if that fails, each alone, so only a failing request fails."""
        try:
            rows, tokens = self.runner.add(group)
        except Exception as e:
            if len(group) > 1:
                for seq in group:
                    self._prefill([seq])
                return
            event(log, "request_step_failed", logging.ERROR, request_id=group[0].request_id, error=repr(e)[:300])
            self.outputs.finish(group[0], error=EngineError(f"generation failed: {type(e).__name__}: {e}"))
            return
        if rows:  # a runner that prefills in its decode steps returns none here
            self._emit(rows, tokens, forward_rows=len(rows))
            self.runner.drop_finished()

    # ---- engine thread: tokens to outputs -----------------------------------------------

    def _emit(self, rows: list[Sequence], tokens: list[int], forward_rows: int) -> None:
        """Each row's token to its output; count one forward pass over `forward_rows` rows."""
        self.outputs.append_all(rows, tokens)
        tokens_made = self.outputs.take_tokens()
        self.tokens_generated_total += tokens_made
        self.steps_total += 1
        now = time.monotonic()
        with self._recent_lock:
            self._recent.append((now, tokens_made, forward_rows))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()

    @property
    def _pending(self) -> list:
        return self.outputs.pending

    def _flush(self) -> None:
        """Hand this step's outputs to their event loops, one wake-up per loop."""
        self.outputs.flush()
