"""Autoscaling on the head: the proxies' load reports, the decision rule over a load history, and the loop
that writes each autoscaled deployment's replica count through the controller."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from gridserve.common.autoscaling_config import AutoscalingConfig
from gridserve.common.errors import ConfigError, InvalidRequest
from gridserve.common.eventlog import event
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.head.autoscaler")

REPORT_FRESH_S = 3.0  # a proxy's report counts this long (proxies send one a second)
TICK_S = 1.0


@dataclass(frozen=True)
class LoadSample:
    at: float    # monotonic seconds
    load: float  # the deployment's ongoing + queued requests, summed over the proxies


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str


def wanted(load: float, cfg: AutoscalingConfig) -> int:
    """Replicas for `load` at target_ongoing_requests each, within [min_replicas, max_replicas]."""
    n = math.ceil(load / cfg.target_ongoing_requests - 1e-9)
    return max(cfg.min_replicas, min(cfg.max_replicas, n))


def averaged(history: Sequence[LoadSample], at: float, look_back_s: float) -> float:
    """The mean load of the samples in (at - look_back_s, at]."""
    window = [s.load for s in history if at - look_back_s < s.at <= at]
    return sum(window) / len(window) if window else 0.0


def _sustained(cfg: AutoscalingConfig, history: Sequence[LoadSample], now: float, delay_s: float,
               better: Callable[[int], bool]) -> list[tuple[int, float]] | None:
    """(wanted, averaged load) of every sample of the last `delay_s`, if each wanted count passes `better`
    and the history reaches back that far; else None."""
    if not history or history[0].at > now - delay_s:
        return None
    window = [s for s in history if s.at >= now - delay_s] or [history[-1]]
    out = []
    for s in window:
        load = averaged(history, s.at, cfg.look_back_period_s)
        n = wanted(load, cfg)
        if not better(n):
            return None
        out.append((n, load))
    return out


def decide(cfg: AutoscalingConfig, current: int, history: Sequence[LoadSample], now: float) -> Decision | None:
    """The replica count a deployment at `current` should move to, and why; None: stay.

    Up when every moment of the last upscale_delay_s wanted more (to the least it wanted), down when every
    moment of the last downscale_delay_s wanted fewer (to the most it wanted): a load that wavers around a
    boundary changes nothing. From zero, any demand scales up at once: a request is waiting."""
    if current < cfg.min_replicas:
        return Decision(cfg.min_replicas, f"below min_replicas={cfg.min_replicas}")
    if current > cfg.max_replicas:
        return Decision(cfg.max_replicas, f"above max_replicas={cfg.max_replicas}")
    if not history:
        return None
    target = cfg.target_ongoing_requests
    latest = history[-1]
    if current == 0 and latest.load > 0:
        n = max(1, wanted(latest.load, cfg))
        return Decision(n, f"{latest.load:g} request(s) waiting with no replica")
    up = _sustained(cfg, history, now, cfg.upscale_delay_s, lambda n: n > current)
    if up:
        n, load = min(up)
        return Decision(n, f"load {load:.1f} > {current} x {target:g} ongoing requests for {cfg.upscale_delay_s:g}s")
    down = _sustained(cfg, history, now, cfg.downscale_delay_s, lambda n: n < current)
    if down:
        n, load = max(down)
        return Decision(n, f"load {load:.1f} needs only {n} x {target:g} ongoing requests for "
                           f"{cfg.downscale_delay_s:g}s")
    return None


class LoadBook:
    """The latest load report of each proxy, by proxy id."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._reports: dict[str, tuple[float, head_pb2.LoadReport]] = {}

    def put(self, report: head_pb2.LoadReport) -> None:
        self._reports[report.proxy_id] = (self.clock(), report)

    def fresh(self, now: float) -> list[head_pb2.LoadReport]:
        self._reports = {p: (t, r) for p, (t, r) in self._reports.items() if now - t <= REPORT_FRESH_S}
        return [r for _, r in self._reports.values()]

    @staticmethod
    def totals(reports: list[head_pb2.LoadReport]) -> dict[str, float]:
        """Ongoing + queued requests per model, summed over the reports."""
        out: dict[str, float] = {}
        for r in reports:
            for m in r.models:
                out[m.model] = out.get(m.model, 0.0) + m.ongoing + m.queued
        return out


@dataclass
class ModelScaling:
    """The autoscaler's memory of one deployment: its load history and last decision."""
    history: deque = field(default_factory=deque)
    load: float = 0.0
    decision: str = ""
    decided_at: float = 0.0  # unix time


class Autoscaler:
    """Every second: a load sample per autoscaled deployment (while a proxy reports), then `decide`; a new
    count goes through `controller.autoscale_to`, the path a manual scale takes to the reconcile loop."""

    def __init__(self, controller, clock: Callable[[], float] = time.monotonic, tick_s: float = TICK_S):
        self.ctl = controller
        self.clock = clock
        self.tick_s = tick_s
        self.book = LoadBook(clock)
        self.models: dict[str, ModelScaling] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tick()
            except Exception:  # a bug in one tick must not stop autoscaling; the next one retries
                log.exception("autoscale_tick_failed")

    def tick(self) -> None:
        now = self.clock()
        reports = self.book.fresh(now)
        totals = self.book.totals(reports)
        for name in [m for m in self.models if m not in self.ctl.deployments]:
            del self.models[name]
        for dep in list(self.ctl.deployments.values()):
            cfg = dep.autoscaling
            if cfg is None:
                self.models.pop(dep.model, None)
                continue
            ms = self.models.setdefault(dep.model, ModelScaling())
            if reports:  # no proxy reporting: no sample (an absent proxy is not an idle deployment)
                ms.load = totals.get(dep.model, 0.0)
                ms.history.append(LoadSample(now, ms.load))
            keep = max(cfg.upscale_delay_s, cfg.downscale_delay_s) + cfg.look_back_period_s + 2 * self.tick_s
            while ms.history and ms.history[0].at < now - keep:
                ms.history.popleft()
            d = decide(cfg, dep.replicas, ms.history, now)
            if d is not None and d.target != dep.replicas:
                self._apply(dep, ms, d)

    def _apply(self, dep, ms: ModelScaling, d: Decision) -> None:
        before = dep.replicas
        self.ctl.autoscale_to(dep.model, d.target)
        ms.decision, ms.decided_at = f"{before} -> {d.target}: {d.reason}", time.time()
        event(log, "autoscale", model=dep.model, replicas=d.target, previous=before, load=f"{ms.load:g}",
              reason=d.reason)

    def on_report(self, report: head_pb2.LoadReport) -> None:
        """Keeps a proxy's report; a request held for a deployment at zero decides now, not at the next tick."""
        self.book.put(report)
        zero = {m for m, dep in self.ctl.deployments.items() if dep.autoscaling and dep.replicas == 0}
        if any(m.queued and m.model in zero for m in report.models):
            self.tick()

    def annotate(self, status: head_pb2.ClusterStatus) -> None:
        """Fills each autoscaled deployment's AutoscalingStatus in a ClusterStatus."""
        for d in status.deployments:
            dep = self.ctl.deployments.get(d.model)
            if dep is None or dep.autoscaling is None:
                continue
            cfg, ms = dep.autoscaling, self.models.get(d.model, ModelScaling())
            d.autoscaling.CopyFrom(head_pb2.AutoscalingStatus(
                min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas,
                target_ongoing_requests=cfg.target_ongoing_requests, load=ms.load, last_decision=ms.decision,
                last_decision_at=ms.decided_at, config_json=cfg.to_json()))


def autoscaling_settings(config, given_json: str, old) -> AutoscalingConfig | None:
    """A deployment's autoscaling: the fields given on deploy over the catalog entry's block; a redeploy
    without fields keeps the settings the deployment has; "null" asks for a fixed count. None: fixed."""
    try:
        given = json.loads(given_json) if given_json else {}
    except ValueError as e:
        raise InvalidRequest(f"autoscaling_json is not valid JSON: {e}") from None
    base = old.autoscaling if old is not None and old.autoscaling else config.autoscaling
    if given is None:
        return None
    if not isinstance(given, dict):
        raise InvalidRequest("autoscaling_json must be a JSON object of autoscaling fields, or null")
    if not given:
        return base
    try:
        return AutoscalingConfig.from_dict(given, base=base)
    except ConfigError as e:
        raise InvalidRequest(e.message) from None


def scaling_start(cfg: AutoscalingConfig, old) -> int:
    """The first target of an autoscaled deployment: its current count clamped to the new range on a
    redeploy, else initial_replicas (or min_replicas)."""
    if old is not None and old.autoscaling is not None:
        return max(cfg.min_replicas, min(cfg.max_replicas, old.replicas))
    return cfg.start_replicas


def route_config(dep):
    """The config the proxies get for a deployment: its model config with the autoscaling in effect, so a
    proxy knows which models scale to zero (replicas get the catalog's config: a new range restarts none)."""
    if dep.autoscaling == dep.config.autoscaling:
        return dep.config
    return dataclasses.replace(dep.config, autoscaling=dep.autoscaling)
