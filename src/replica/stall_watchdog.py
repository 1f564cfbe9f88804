"""Engine progress watchdog: health goes NOT_SERVING while the engine has work but finishes no step."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from gridserve.common.grpcutil import NOT_SERVING, SERVING
from gridserve.common.eventlog import event

log = logging.getLogger("gridserve.replica")
CHECK_INTERVAL_S = 0.5


class StallWatch:
    """Checks `engine.stats().seconds_since_step` every interval against the model's stall timeout.

    Past it: health NOT_SERVING and one `engine_stalled` event, so the scheduler replaces a replica
    whose gRPC server still answers but whose engine is stuck (a hung kernel, a deadlock). When steps
    resume: SERVING again and `engine_recovered`. `set_health(status)` sets every served name; once
    a drain has begun the health servicer ignores it, so the watchdog never undoes a drain.
    """

    def __init__(self, engine, timeout_s: float, set_health: Callable[[int], Awaitable[None]],
                 interval_s: float = CHECK_INTERVAL_S):
        self.engine = engine
        self.timeout_s = timeout_s
        self.set_health = set_health
        self.interval_s = interval_s
        self.stalled = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()

    async def check(self) -> bool:
        """One look at the engine; changes health when it just stalled or just recovered. True while stalled."""
        s = self.engine.stats()
        stalled = s.seconds_since_step > self.timeout_s or bool(getattr(self.engine, "dead", ""))
        if stalled and not self.stalled:
            event(log, "engine_stalled", logging.WARNING, seconds=f"{s.seconds_since_step:.1f}",
                  running=s.running, waiting=s.waiting, stall_timeout_s=self.timeout_s)
            await self.set_health(NOT_SERVING)
        elif self.stalled and not stalled:
            event(log, "engine_recovered", running=s.running, waiting=s.waiting, steps_total=s.steps_total)
            await self.set_health(SERVING)
        self.stalled = stalled
        return stalled
