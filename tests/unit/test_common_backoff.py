"""The one backoff of every restart and reconnect loop: doubling, capped, jittered, reset after a stable run."""
from __future__ import annotations

import pytest

from gridserve.common.backoff import Backoff


def test_delays_double_from_first_up_to_the_cap():
    b = Backoff(0.25, 5.0)
    assert [b.next_delay() for _ in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_stable_run_starts_the_sequence_over_and_a_short_one_does_not():
    b = Backoff(0.5, 8.0, stable_s=10.0)
    assert [b.next_delay(ran_s=1.0) for _ in range(3)] == [0.5, 1.0, 2.0]
    assert b.next_delay(ran_s=9.9) == 4.0
    assert b.next_delay(ran_s=10.0) == 0.5
    b.next_delay()
    b.reset()
    assert b.next_delay() == 0.5


def test_jitter_stays_within_its_band_and_never_passes_the_cap():
    b = Backoff(1.0, 2.0, jitter=0.5)
    firsts = []
    for _ in range(200):
        b.reset()
        firsts.append(b.next_delay())
    assert 0.5 <= min(firsts) < max(firsts) <= 1.5
    later = [b.next_delay() for _ in range(200)]
    assert all(1.0 <= d <= 2.0 for d in later)


def test_many_attempts_do_not_overflow():
    b = Backoff(1.0, 30.0)
    assert [b.next_delay() for _ in range(5000)][-1] == 30.0


@pytest.mark.parametrize("first, cap, jitter", [(0, 1, 0), (2, 1, 0), (1, 2, 1.0)])
def test_a_nonsense_backoff_is_refused(first, cap, jitter):
    with pytest.raises(ValueError):
        Backoff(first, cap, jitter)
