"""The embedding engine: one thread owns the encoder and embeds the inputs of every queued request in shared forward passes."""
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
from gridserve.replica.embedding_model import LoadedEmbedder

__all__ = ["EmbeddingEngine", "EmbeddingStats", "EmbedHandle", "EmbedResult", "MAX_INPUTS"]
log = logging.getLogger("gridserve.replica.embedding_engine")
RATE_WINDOW_S = 5.0
MAX_INPUTS = 2048  # inputs in one request, as OpenAI allows


class EmbedError(GridserveError):
    """The forward pass failed for this request (maps to INTERNAL); the engine goes on serving others."""


@dataclass
class EmbeddingStats:
    """The generation engine's stats, read the same way by Info and the stall watchdog; here rows are inputs."""
    running: int              # inputs in the forward pass now
    waiting: int              # inputs queued for a forward pass
    requests_total: int
    tokens_generated_total: int  # always 0: an embedding model generates nothing
    tokens_per_second: float  # input tokens embedded per second over the last RATE_WINDOW_S seconds
    rss_bytes: int
    max_batch_size: int = 0
    max_waiting: int = 0
    steps_total: int = 0      # forward passes so far
    mean_batch_size: float = 0.0  # inputs per forward pass over the last RATE_WINDOW_S seconds
    num_threads: int = 0
    seconds_since_step: float = 0.0  # with work: since the last finished pass (or the work's arrival); 0 idle
    input_tokens_total: int = 0
    prompt_tokens_cached_total: int = 0    # always 0: no prefix cache (Info reports it for every engine)
    prompt_tokens_prefilled_total: int = 0


@dataclass
class EmbedResult:
    vectors: torch.Tensor  # [inputs, dimensions] float32 unit vectors, in the order of the inputs
    prompt_tokens: int     # tokens of every input, special tokens included


class EmbedJob:
    """One request inside the engine: its texts, the vectors and token counts so far, the future that gets them."""

    def __init__(self, request_id: str, texts: list[str], loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.texts = texts
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.vectors: list[torch.Tensor | None] = [None] * len(texts)
        self.tokens = 0      # of the inputs embedded so far
        self.next = 0        # the first input not yet taken into a forward pass
        self.done = 0        # inputs embedded
        self.cancelled = False
        self.finished = False

    @property
    def unscheduled(self) -> int:
        return len(self.texts) - self.next


class EmbedHandle:
    """The asyncio side of one request: await `result()`, call `cancel()` when the caller goes away."""

    def __init__(self, engine: "EmbeddingEngine", job: EmbedJob):
        self._engine, self._job = engine, job
        self.request_id = job.request_id
        self.inputs = len(job.texts)

    async def result(self) -> EmbedResult:
        """The vectors and token count; raises the request's error (InvalidRequest for an input too long)."""
        return await self._job.future

    def cancel(self) -> None:
        if not self._job.finished:
            self._engine.abort(self._job)


class EmbeddingEngine:
    """Embeds for one loaded encoder in a dedicated thread, batching across requests.

    `submit` (on the event loop) answers at once: a handle, or Overloaded when the inputs queued and
    running would pass max_batch_size + max_waiting (a request alone on an idle engine is always
    taken), so the caller hears at once whether its request was taken. Each pass takes up to
    max_batch_size inputs from the front of the queue, whichever requests they belong to (a large
    request spans several passes), tokenizes them in one call (a request with an input longer than
    context_length fails alone, with InvalidRequest), runs one right-padded forward, mean-pools over
    the attention mask and L2-normalises. A request's future is settled when its
    last input is embedded; one pass's results reach each event loop in one hand-off.
    """

    def __init__(self, loaded: LoadedEmbedder, num_threads: int = 1, max_batch_size: int | None = None,
                 max_waiting: int | None = None):
        self.loaded = loaded
        self.context_length = loaded.config.context_length
        self.max_batch_size = max_batch_size or loaded.config.max_batch_size
        self.max_waiting = loaded.config.max_waiting if max_waiting is None else max_waiting
        self.num_threads = num_threads
        self._cv = threading.Condition()
        self._queue: collections.deque[EmbedJob] = collections.deque()
        self._queued_inputs = 0
        self._running_inputs = 0
        self._stopping = False
        self.wedged = False  # fault injection: while set, the engine thread makes no passes
        self._progress_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self.requests_total = 0
        self.input_tokens_total = 0
        self.steps_total = 0
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, tokens, rows)
        self._settle: list[tuple[EmbedJob, object]] = []  # this pass's results (engine thread)
        self._proc = psutil.Process()
        self.torch_threads = 0

    # ---- asyncio side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="embedding-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is queued with UNAVAILABLE (another replica can embed it), end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request_id: str, texts: list[str]) -> EmbedHandle:
        """Queue a request's texts; call on the event loop. Answers at once (no tokenizing here)."""
        self._check(texts)
        rows = list(texts)
        job = EmbedJob(request_id or f"embed-{next(self._ids)}", rows, asyncio.get_running_loop())
        capacity = self.max_batch_size + self.max_waiting
        with self._cv:
            if self._stopping:
                raise Unavailable("the replica is shutting down")
            held = self._queued_inputs + self._running_inputs
            if held and held + len(rows) > capacity:
                raise Overloaded(f"replica is full: {held} inputs queued or being embedded, and {len(rows)} more "
                                 f"would pass max_batch_size + max_waiting = {capacity}")
            if not held:
                self._progress_at = time.monotonic()  # an idle engine was not stalled: the clock starts now
            self._queue.append(job)
            self._queued_inputs += len(rows)
            self.requests_total += 1
            self._cv.notify_all()
        return EmbedHandle(self, job)

    @staticmethod
    def _check(texts: list[str]) -> None:
        if not texts:
            raise InvalidRequest("no inputs: send at least one text to embed")
        if len(texts) > MAX_INPUTS:
            raise InvalidRequest(f"{len(texts)} inputs in one request; at most {MAX_INPUTS} are allowed")
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:
            raise InvalidRequest(f"input[{empty}] is an empty string: every input must have some text")

    def abort(self, job: EmbedJob) -> None:
        """Cancel a request: its queued inputs leave the queue; a pass already running finishes unread."""
        with self._cv:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self._queued_inputs -= job.unscheduled
            job.finished = True
            if not job.future.done():
                job.future.cancel()

    def wedge(self, on: bool = True) -> None:
        """Fault injection (tests only): while wedged the engine thread makes no passes."""
        with self._cv:
            self.wedged = on
            self._cv.notify_all()

    def stats(self) -> EmbeddingStats:
        with self._cv:
            running, waiting = self._running_inputs, self._queued_inputs
            now = time.monotonic()
            recent = [r for r in self._recent if now - r[0] <= RATE_WINDOW_S]
            since = max(0.0, now - self._progress_at) if running or waiting else 0.0
        span = min(RATE_WINDOW_S, max(1.0, now - recent[0][0])) if recent else 1.0
        return EmbeddingStats(running=running, waiting=waiting, requests_total=self.requests_total,
                              tokens_generated_total=0, tokens_per_second=sum(r[1] for r in recent) / span,
                              rss_bytes=self._proc.memory_info().rss, max_batch_size=self.max_batch_size,
                              max_waiting=self.max_waiting, steps_total=self.steps_total,
                              mean_batch_size=sum(r[2] for r in recent) / len(recent) if recent else 0.0,
                              num_threads=self.torch_threads, seconds_since_step=since,
                              input_tokens_total=self.input_tokens_total)

    def set_threads(self, num_threads: int) -> None:
        """Run `num_threads` torch threads from the next batch on; the engine thread applies it."""
        with self._cv:
            self.num_threads = num_threads
            self._cv.notify_all()

    # ---- engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        applied = 0
        while True:
            with self._cv:
                while not self._stopping and (self.wedged or not self._queue) and self.num_threads == applied:
                    self._cv.wait()
                if self._stopping:
                    break
                wanted = self.num_threads
            if wanted != applied:
                torch.set_num_threads(wanted)
                applied, self.torch_threads = wanted, torch.get_num_threads()
            with self._cv:
                if self.wedged or not self._queue:
                    continue
                batch = self._take()
            try:
                self._pass(batch)
            finally:
                with self._cv:
                    self._running_inputs = 0
                    self._progress_at = time.monotonic()
                self._flush()
        with self._cv:
            leftover, self._queued_inputs = list(self._queue), 0
            self._queue.clear()
        for job in leftover:
            self._fail(job, Unavailable("the replica is shutting down"))
        self._flush()

    def _take(self) -> list[tuple[EmbedJob, int]]:
        """Up to max_batch_size (request, input index) pairs from the front of the queue (holding the lock)."""
        batch: list[tuple[EmbedJob, int]] = []
        while self._queue and len(batch) < self.max_batch_size:
            job = self._queue[0]
            n = min(job.unscheduled, self.max_batch_size - len(batch))
            batch.extend((job, i) for i in range(job.next, job.next + n))
            job.next += n
            if not job.unscheduled:
                self._queue.popleft()
        self._queued_inputs -= len(batch)
        self._running_inputs = len(batch)
        return batch

    def _pass(self, batch: list[tuple[EmbedJob, int]]) -> None:
        """Tokenize and embed the batch; an input too long fails its request alone."""
        live = [(job, i) for job, i in batch if not job.cancelled and not job.finished]
        if not live:
            return
        try:
            rows = self.loaded.encode([job.texts[i] for job, i in live])
        except Exception as e:  # a tokenizer failure: each request alone, as for a failed forward
            rows = [None] * len(live)
            event(log, "tokenize_failed", logging.ERROR, rows=len(live), error=repr(e)[:300])
        keep = []
        for (job, i), ids in zip(live, rows):
            if ids is not None and len(ids) > self.context_length:
                self._fail(job, InvalidRequest(f"input[{i}] is {len(ids)} tokens; model "
                                               f"'{self.loaded.config.name}' embeds at most "
                                               f"{self.context_length} tokens per input"))
            elif not job.finished:
                keep.append(((job, i), ids))
        self._forward([p for p, _ in keep], [ids for _, ids in keep])

    def _forward(self, live: list[tuple[EmbedJob, int]], rows: list[list[int] | None]) -> None:
        """One forward over the rows; if it fails, each request's part alone, so only a failing one fails."""
        if not live:
            return
        try:
            if any(r is None for r in rows):
                raise ValueError("the tokenizer failed on this batch")
            vectors = self.loaded.embed(rows)
        except Exception as e:
            jobs = list(dict.fromkeys(job for job, _ in live))
            if len(jobs) > 1:
                for job in jobs:
                    self._pass([(j, i) for j, i in live if j is job])  # tokenized again, alone
                return
            event(log, "embed_pass_failed", logging.ERROR, request_id=jobs[0].request_id, rows=len(rows),
                  error=repr(e)[:300])
            self._fail(jobs[0], EmbedError(f"embedding failed: {type(e).__name__}: {e}"))
            return
        for (job, i), vector, ids in zip(live, vectors, rows):
            job.vectors[i] = vector
            job.tokens += len(ids)
            job.done += 1
            if job.done == len(job.texts) and not job.finished:
                job.finished = True
                self._settle.append((job, EmbedResult(torch.stack(job.vectors), job.tokens)))
        self._record(sum(len(r) for r in rows), len(rows))

    def _fail(self, job: EmbedJob, error: GridserveError) -> None:
        with self._cv:
            if job in self._queue:
                self._queue.remove(job)
                self._queued_inputs -= job.unscheduled
        if not job.finished:
            job.finished = True
            self._settle.append((job, error))

    def _flush(self) -> None:
        """Hand this pass's results to their event loops, one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, value in self._settle:
            by_loop.setdefault(job.loop, []).append((job.future, value))
        self._settle = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, items)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _record(self, tokens: int, rows: int) -> None:
        self.input_tokens_total += tokens
        self.steps_total += 1
        now = time.monotonic()
        with self._cv:
            self._recent.append((now, tokens, rows))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()


def _settle_all(items: list[tuple[asyncio.Future, object]]) -> None:
    for future, value in items:
        if future.done():  # cancelled by a caller that went away
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


def build_embedding_engine(cfg) -> EmbeddingEngine:
    """Runs in the replica's load thread: load the encoder a ReplicaConfig names, build (not start) the engine."""
    from gridserve.replica.embedding_model import load_embedder
    return EmbeddingEngine(load_embedder(cfg.model), cfg.num_threads)
