"""Admission and scheduling: the waiting queue, the running set, the 429 limit and what each step admits."""
from __future__ import annotations

import collections
import threading
import time

from gridserve.common.errors import Overloaded, Unavailable
from gridserve.replica.outputs import RequestOutput
from gridserve.replica.sequence import Sequence


# An idle engine that gets a request waits while more keep coming, each within GATHER_GAP_S of the
# last, for at most GATHER_MAX_S: clients that start together (a page of chats, a batch job) are
# then prefilled in one step instead of the first alone while the rest queue behind it. A request
# that comes alone waits GATHER_GAP_S; rows already running never wait for it.
GATHER_GAP_S = 0.010
GATHER_MAX_S = 0.050


class BatchScheduler:
    """Shared by the event loop (submit, abort, stats) and the engine thread (admit, finish), under one lock.

    A request is either waiting (queued for a free row) or running (holding a row of the batch,
    being prefilled or decoding). `submit` refuses with Overloaded at once when max_batch_size rows
    run and max_waiting wait. `admit` moves waiting requests to free rows, at most `prefill_tokens`
    prompt tokens of newcomers per step (at least one request), so running rows never wait long.
    """

    def __init__(self, max_batch_size: int, max_waiting: int, prefill_tokens: int,
                 gather_gap_s: float = GATHER_GAP_S, gather_max_s: float = GATHER_MAX_S):
        self.max_batch_size = max_batch_size
        self.gather_gap_s, self.gather_max_s = gather_gap_s, gather_max_s
        self.arrived_at = 0.0  # monotonic time of the last submit
        self.max_waiting = max_waiting
        self.prefill_tokens = prefill_tokens
        self.cv = threading.Condition()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.stopping = False
        self.dead = ""       # why the engine thread died; set once, then every submit is refused
        self.wedged = False  # fault injection: while set, the engine thread makes no steps
        self.poked = False   # wake the engine thread once without work (to apply a new thread count)
        self.progress_at = time.monotonic()  # last finished step, or work arriving at an idle engine
        self.requests_total = 0

    # ---- event loop side ----------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self.cv:
            if self.dead:
                raise Unavailable(f"the replica's engine is dead ({self.dead})")
            if self.stopping:
                raise Unavailable("the replica is shutting down")
            running = sum(not s.cancelled for s in self.running)  # a cancelled row's slot is free already
            if running + len(self.waiting) >= self.max_batch_size + self.max_waiting:
                raise Overloaded(f"replica is full: {running} running (max_batch_size={self.max_batch_size}), "
                                 f"{len(self.waiting)} waiting (max_waiting={self.max_waiting})")
            if not self.running and not self.waiting:
                self.progress_at = time.monotonic()  # an idle engine was not stalled: the clock starts now
            self.waiting.append(seq)
            self.arrived_at = time.monotonic()
            self.requests_total += 1
            self.cv.notify_all()

    def abort(self, seq: Sequence) -> None:
        """Cancel a request: a waiting one leaves the queue now, a running one at the next step."""
        with self.cv:
            seq.cancelled = True
            if seq in self.waiting:
                self.waiting.remove(seq)
                seq.finished = True
                seq.emit(RequestOutput(finish_reason="abort"))
            self.cv.notify_all()

    def counts(self) -> tuple[int, int, float]:
        """(running, waiting, seconds since the last step while there is work, else 0)."""
        with self.cv:
            running, waiting = len(self.running), len(self.waiting)
            since = max(0.0, time.monotonic() - self.progress_at) if running or waiting else 0.0
        return running, waiting, since

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()

    def poke(self) -> None:
        with self.cv:
            self.poked = True
            self.cv.notify_all()

    def wedge(self, on: bool) -> None:
        with self.cv:
            self.wedged = on
            self.cv.notify_all()

    # ---- engine thread side -------------------------------------------------------------

    def wait_for_work(self) -> bool:
        """Block until there is something to do; False once stopping."""
        with self.cv:
            while not self.stopping and (self.wedged or not (self.waiting or self.running or self.poked)):
                self.cv.wait()
            self.poked = False
            if not self.running and self.waiting:
                self._gather()
            return not self.stopping

    def _gather(self) -> None:
        """(Under the lock, idle engine, work waiting.) Wait while requests keep arriving (see GATHER_GAP_S)."""
        deadline = time.monotonic() + self.gather_max_s
        while not self.stopping and len(self.waiting) < self.max_batch_size:
            now = time.monotonic()
            until = min(deadline, self.arrived_at + self.gather_gap_s)
            if now >= until:
                return
            self.cv.wait(until - now)

    def admit(self, free_rows: int | None = None) -> list[Sequence]:
        """Take waiting requests for free rows, up to the prefill budget."""
        admitted: list[Sequence] = []
        width = 0
        with self.cv:
            free = self.max_batch_size - len(self.running) if free_rows is None else free_rows
            while self.waiting and len(admitted) < free:
                seq = self.waiting[0]
                width = max(width, len(seq.context_ids))
                if admitted and width * (len(admitted) + 1) > self.prefill_tokens:
                    break
                self.waiting.popleft()
                admitted.append(seq)
                self.running.append(seq)
        return admitted

    def release(self, seq: Sequence) -> None:
        """A request finished: its row is free."""
        with self.cv:
            if seq in self.running:
                self.running.remove(seq)
            self.cv.notify_all()

    def stepped(self) -> None:
        self.progress_at = time.monotonic()

    def take_all(self, dead: str = "") -> list[Sequence]:
        """Every open request (for stop or death); with `dead`, refuse new ones from now on."""
        with self.cv:
            if dead:
                self.dead = dead
            seqs = list(self.waiting) + list(self.running)
            self.waiting.clear()
            self.running.clear()
            return seqs
