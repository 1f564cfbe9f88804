"""Scale to zero on the proxy: a request for a deployment at zero replicas waits (bounded queue, timeout)
while the head starts one, then goes on; one that waits too long gets 503 with Retry-After."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable

from gridserve.common.eventlog import event
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.route_cache import ModelRoute, RouteCache

log = logging.getLogger("gridserve.proxy.zero_hold")

POLL_S = 0.05  # how often a held request looks at the routing table


def scales_to_zero(route: ModelRoute | None) -> bool:
    """The deployment is autoscaled with min_replicas 0 (the head puts its autoscaling in the route config)."""
    return bool(route and route.config.autoscaling and route.config.autoscaling.min_replicas == 0)


class ZeroHold:
    """Holds at most `max_held` requests per model for at most `timeout_s` each."""

    def __init__(self, timeout_s: float = 60.0, max_held: int = 100, on_hold: Callable[[], None] = lambda: None):
        self.timeout_s, self.max_held, self.on_hold = timeout_s, max_held, on_hold
        self.held: Counter[str] = Counter()

    async def wait(self, table: RouteCache, model: str) -> None:
        """Returns at once unless `model` scales to zero and has no ready replica; then waits for one."""
        route = table.routes.get(model)
        if route is None or route.endpoints or not scales_to_zero(route):
            return
        if self.held[model] >= self.max_held:
            raise HttpError(503, "service_unavailable", f"model {model!r} is starting from zero replicas and "
                            f"{self.held[model]} requests already wait for it; try again shortly",
                            code="model_starting", headers={"Retry-After": str(max(1, round(self.timeout_s / 4)))})
        self.held[model] += 1
        started = time.monotonic()
        event(log, "request_held", model=model, held=self.held[model])
        self.on_hold()  # tell the head there is demand now, not at the next report
        try:
            while not (table.routes.get(model) and table.routes[model].endpoints):
                if model not in table.routes:
                    return  # undeployed meanwhile: the usual path answers 404
                if time.monotonic() - started >= self.timeout_s:
                    raise HttpError(503, "service_unavailable", f"model {model!r} is scaled to zero and no "
                                    f"replica became ready within {self.timeout_s:g}s; one is starting, try again",
                                    code="model_starting", headers={"Retry-After": "5"})
                await asyncio.sleep(POLL_S)
            event(log, "request_released", model=model, waited_ms=round((time.monotonic() - started) * 1000))
        finally:
            self.held[model] -= 1
            if self.held[model] <= 0:
                del self.held[model]
