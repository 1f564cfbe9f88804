"""The continuous-batching engine: one thread owns the model and runs every active request in one forward per step."""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from gridserve.common.errors import GridserveError, InvalidRequest, Overloaded, Unavailable
from gridserve.common.eventlog import event
from gridserve.replica.kv_cache import KVBatch, check_supported
from gridserve.replica.model_loader import LoadedModel
from gridserve.replica.request_params import SamplingOptions
from gridserve.replica.outputs import EngineError, RequestHandle, RequestOutput, Sequence, deliver
from gridserve.replica.sampling import row_generator, sample_rows

__all__ = ["Engine", "EngineError", "EngineStats", "RequestHandle", "RequestOutput"]
log = logging.getLogger("gridserve.replica.engine")
RATE_WINDOW_S = 5.0
# Padded prompt tokens one step may prefill (at least one request is always admitted): bounds how
# long the running rows wait for newcomers' prefill.
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


class Engine:
    """Runs generation for one loaded model in a dedicated thread, continuously batched.

    The asyncio side calls `submit` (answers at once: a handle, or Overloaded when max_batch_size
    rows run and max_waiting wait) and reads the handle's outputs. Each engine step drops cancelled
    rows, prefills newcomers as one left-padded batch and appends them to the running `KVBatch`,
    then runs one decode forward for every row, samples a token per row (each with its own
    options and seed), and removes finished rows at once. A step's outputs reach the event loop
    in one hand-off. `stats().seconds_since_step` shows whether it is making progress.
    """

    def __init__(self, loaded: LoadedModel, num_threads: int = 1, max_batch_size: int | None = None,
                 max_waiting: int | None = None, prefill_tokens: int = PREFILL_TOKENS):
        check_supported(loaded.model)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.context_length = loaded.config.context_length
        self.max_batch_size = max_batch_size or loaded.config.max_batch_size
        self.max_waiting = loaded.config.max_waiting if max_waiting is None else max_waiting
        self.prefill_tokens = prefill_tokens
        self.num_threads = num_threads
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []  # admitted and not finished (under the lock)
        self._rows: list[Sequence] = []     # the batch's rows, in order (engine thread only)
        self._batch = KVBatch(self.model, self.device)
        self._pending: list[tuple[Sequence, RequestOutput]] = []  # this step's outputs (engine thread)
        self._stopping = False
        self.wedged = False  # fault injection: while set, the engine thread makes no steps
        self._progress_at = time.monotonic()  # last finished step, or work arriving at an idle engine
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.requests_total = 0
        self.tokens_generated_total = 0
        self.steps_total = 0
        self._step_tokens = 0
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, tokens, rows)
        self._proc = psutil.Process()
        self.torch_threads = 0  # what torch reports inside the engine thread, once it runs

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
        with self._cv:
            if self._stopping:
                raise Unavailable("the replica is shutting down")
            running = sum(not s.cancelled for s in self._running)  # a cancelled row's slot is free already
            if running + len(self._waiting) >= self.max_batch_size + self.max_waiting:
                raise Overloaded(f"replica is full: {running} running (max_batch_size={self.max_batch_size}), "
                                 f"{len(self._waiting)} waiting (max_waiting={self.max_waiting})")
            if not self._running and not self._waiting:
                self._progress_at = time.monotonic()  # an idle engine was not stalled: the clock starts now
            self._waiting.append(seq)
            self.requests_total += 1
            self._cv.notify_all()
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
        with self._cv:
            self.wedged = on
            self._cv.notify_all()

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
            recent = [r for r in self._recent if now - r[0] <= RATE_WINDOW_S]
            since_step = max(0.0, now - self._progress_at) if running or waiting else 0.0
        span = min(RATE_WINDOW_S, max(1.0, now - recent[0][0])) if recent else 1.0
        return EngineStats(running=running, waiting=waiting, requests_total=self.requests_total,
                           tokens_generated_total=self.tokens_generated_total,
                           tokens_per_second=sum(r[1] for r in recent) / span,
                           rss_bytes=self._proc.memory_info().rss, max_batch_size=self.max_batch_size,
                           max_waiting=self.max_waiting, steps_total=self.steps_total,
                           mean_batch_size=sum(r[2] for r in recent) / len(recent) if recent else 0.0,
                           num_threads=self.torch_threads, seconds_since_step=since_step)

    # ---- engine thread: the loop --------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.num_threads)
        self.torch_threads = torch.get_num_threads()
        while True:
            with self._cv:
                while not self._stopping and (self.wedged or not (self._waiting or self._running)):
                    self._cv.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            try:
                self._step(admitted)
            except Exception as e:  # the batched forward failed: every row fails, the engine goes on
                event(log, "engine_step_failed", logging.ERROR, rows=len(self._rows), error=repr(e)[:300])
                for seq in self._rows + admitted:
                    self._finish(seq, error=EngineError(f"generation failed: {type(e).__name__}: {e}"))
                self._rows, self._batch = [], KVBatch(self.model, self.device)
            self._progress_at = time.monotonic()
            self._flush()
        with self._cv:
            leftover = list(self._waiting) + list(self._running)
            self._waiting.clear()
        for seq in leftover:
            self._finish(seq, "abort")
        self._flush()

    def _admit(self) -> list[Sequence]:
        """Take waiting requests for free rows, up to the prefill budget (holding the lock)."""
        admitted: list[Sequence] = []
        width = 0
        while self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting[0]
            width = max(width, len(seq.context_ids))
            if admitted and width * (len(admitted) + 1) > self.prefill_tokens:
                break
            self._waiting.popleft()
            seq.generator = row_generator(seq.opts, self.device)
            admitted.append(seq)
            self._running.append(seq)
        return admitted

    @torch.inference_mode()
    def _step(self, admitted: list[Sequence]) -> None:
        """Drop cancelled rows, prefill newcomers into the batch, then one token for every row."""
        for seq in self._rows + admitted:
            if seq.cancelled:
                self._finish(seq, "abort")
        self._compact()
        newcomers = [s for s in admitted if not s.finished and self._replay(s)]
        if newcomers:
            self._prefill(newcomers)
        if self._rows:
            rows = list(self._rows)
            self._sample(rows, self._batch.decode([s.last_token for s in rows]))
            self._compact()

    def _replay(self, seq: Sequence) -> bool:
        """Bring a resumed request's text pipeline to where the first replica's was; False if that ends it."""
        if seq.resume_tokens and not seq.replay_resume():
            self._finish(seq, error=InvalidRequest("resume_token_ids already complete a stop string: "
                                                   "nothing is left to generate"))
            return False
        return True

    # ---- engine thread: forward passes --------------------------------------------------

    def _prefill(self, group: list[Sequence]) -> None:
        """Prefill a group as one batch; if that fails, each alone, so only a failing request fails."""
        try:
            logits = self._batch.prefill([s.context_ids for s in group])
        except Exception as e:
            if len(group) > 1:
                for seq in group:
                    self._prefill([seq])
                return
            event(log, "request_step_failed", logging.ERROR, request_id=group[0].request_id, error=repr(e)[:300])
            self._finish(group[0], error=EngineError(f"generation failed: {type(e).__name__}: {e}"))
            return
        self._rows.extend(group)
        self._sample(group, logits)
        self._compact()

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """One token per row from its logits row, then each row's text, stop and length checks."""
        tokens = sample_rows(logits, [s.opts for s in rows], [s.generator for s in rows])
        for seq, token in zip(rows, tokens):
            self._append(seq, token)
        self._record(len(rows))

    def _compact(self) -> None:
        """Remove finished rows from the batch at once (their KV cache with them)."""
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        if len(keep) < len(self._rows):
            self._batch.keep(keep)
            self._rows = [self._rows[i] for i in keep]

    # ---- engine thread: tokens to outputs -----------------------------------------------

    def _append(self, seq: Sequence, token: int) -> None:
        """Record a sampled token, turn it into text, decide whether the request is done, queue its output."""
        seq.output_ids.append(token)
        self._step_tokens += 1
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
            self._pending.append((seq, RequestOutput(text=text, token_ids=[token], completion_tokens=n)))
        else:
            self._finish(seq, reason, last=RequestOutput(text=text, token_ids=[token]))

    def _finish(self, seq: Sequence, reason: str | None = None, error: GridserveError | None = None,
                last: RequestOutput | None = None) -> None:
        """Mark a request done, free its slot, queue its final output; `_compact` drops its row."""
        with self._cv:
            if seq in self._running:
                self._running.remove(seq)
            self._cv.notify_all()
        if seq.finished:
            return
        seq.finished = True
        out = last or RequestOutput()
        out.finish_reason, out.error, out.completion_tokens = reason, error, len(seq.output_ids)
        self._pending.append((seq, out))

    def _flush(self) -> None:
        """Hand this step's outputs to their event loops, one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, out in self._pending:
            by_loop.setdefault(seq.loop, []).append((seq.collector, out))
        self._pending = []
        for loop, items in by_loop.items():
            deliver(loop, items)

    def _record(self, rows: int) -> None:
        """Count one forward pass of `rows` rows and the tokens it produced."""
        tokens, self._step_tokens = self._step_tokens, 0
        self.tokens_generated_total += tokens
        self.steps_total += 1
        now = time.monotonic()
        with self._cv:
            self._recent.append((now, tokens, rows))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
