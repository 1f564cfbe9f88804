"""The one backoff every restart and reconnect loop uses: exponential from `first`, capped, optional jitter,
reset after a stable run. Delays come from tenacity's wait strategies, the same ones the proxy's retries use."""
from __future__ import annotations

import random
from dataclasses import dataclass

from tenacity import wait_exponential


@dataclass
class Backoff:
    """`next_delay()` gives first, 2*first, 4*first ... up to `cap`, each scaled by a random factor in
    [1 - jitter, 1 + jitter] and capped again. A run that lasted `stable_s` or more (passed as `ran_s`)
    starts the sequence over, as does `reset()`."""
    first: float
    cap: float
    jitter: float = 0.0
    stable_s: float | None = None

    def __post_init__(self):
        if not 0 < self.first <= self.cap or not 0 <= self.jitter < 1:
            raise ValueError(f"bad backoff: first={self.first} cap={self.cap} jitter={self.jitter}")
        self._wait = wait_exponential(multiplier=self.first, max=self.cap)
        self.attempt = 0  # delays handed out since the last reset

    def reset(self) -> None:
        self.attempt = 0

    def next_delay(self, ran_s: float | None = None) -> float:
        if ran_s is not None and self.stable_s is not None and ran_s >= self.stable_s:
            self.reset()
        self.attempt += 1
        base = self._wait(_Attempt(self.attempt))
        if self.jitter:
            base *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(base, self.cap)


class _Attempt:
    """The one field of tenacity's RetryCallState that its wait strategies read."""
    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int):
        self.attempt_number = attempt_number
