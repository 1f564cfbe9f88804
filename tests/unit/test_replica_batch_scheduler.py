"""The engine's admission: an idle engine gathers a burst of requests into one step, a busy one never waits."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from gridserve.replica.batch_scheduler import BatchScheduler

pytestmark = pytest.mark.unit


def request(n: int = 5):
    return SimpleNamespace(context_ids=list(range(n)), cancelled=False)


def engine_side(scheduler: BatchScheduler) -> tuple[threading.Thread, list]:
    """A thread doing what the engine thread does first: wait for work, then admit."""
    admitted: list = []

    def run() -> None:
        scheduler.wait_for_work()
        admitted.append(scheduler.admit())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, admitted


def test_an_idle_engine_gathers_requests_arriving_within_the_gap_into_one_step():
    scheduler = BatchScheduler(16, 64, 1024, gather_gap_s=1.0, gather_max_s=10.0)
    thread, admitted = engine_side(scheduler)
    first, second, third = request(), request(), request()
    scheduler.submit(first)
    time.sleep(0.1)
    scheduler.submit(second)
    time.sleep(0.1)
    scheduler.submit(third)
    thread.join(timeout=8)
    assert admitted == [[first, second, third]]


def test_gathering_stops_at_its_limit_while_requests_keep_coming():
    scheduler = BatchScheduler(64, 64, 1 << 30, gather_gap_s=0.5, gather_max_s=0.5)
    thread, admitted = engine_side(scheduler)
    sent = []
    for _ in range(30):  # one every 0.1 s for 3 s: always within the gap, far past the limit
        sent.append(request())
        scheduler.submit(sent[-1])
        time.sleep(0.1)
    thread.join(timeout=5)
    assert admitted and 1 <= len(admitted[0]) < len(sent)


def test_a_full_batch_is_not_held_back_to_gather_more():
    scheduler = BatchScheduler(2, 64, 1024, gather_gap_s=30.0, gather_max_s=30.0)
    thread, admitted = engine_side(scheduler)
    both = [request(), request()]
    for seq in both:
        scheduler.submit(seq)
    thread.join(timeout=10)
    assert admitted == [both]


def test_a_busy_engine_takes_newcomers_at_its_next_step_without_waiting():
    scheduler = BatchScheduler(16, 64, 1024, gather_gap_s=30.0, gather_max_s=30.0)
    scheduler.running.append(request())  # a row already decoding: its tokens must not wait for a gap
    newcomer = request()
    scheduler.submit(newcomer)
    thread, admitted = engine_side(scheduler)
    thread.join(timeout=10)
    assert admitted == [[newcomer]]


def test_stopping_ends_a_gathering_wait():
    scheduler = BatchScheduler(16, 64, 1024, gather_gap_s=30.0, gather_max_s=30.0)
    done: list[bool] = []
    thread = threading.Thread(target=lambda: done.append(scheduler.wait_for_work()), daemon=True)
    thread.start()
    scheduler.submit(request())
    time.sleep(0.1)
    scheduler.stop()
    thread.join(timeout=10)
    assert done == [False]
