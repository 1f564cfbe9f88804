"""What the proxy has in flight per model and replica, reported to the head every second for autoscaling."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter

import grpc

from gridserve.common.eventlog import event
from gridserve.proxy.route_cache import RouteCache, open_channel
from gridserve.v1 import head_pb2, head_pb2_grpc

log = logging.getLogger("gridserve.proxy.load_report")

REPORT_INTERVAL_S = 1.0


class LoadTracker:
    """Requests (generation and embeddings) in this proxy per model, from a parsed body to the answer's end
    (waiting for a replica, streaming, or held while the model has no replica)."""

    def __init__(self):
        self.requests: Counter[str] = Counter()

    def begin(self, model: str) -> None:
        self.requests[model] += 1

    def end(self, model: str) -> None:
        self.requests[model] -= 1
        if self.requests[model] <= 0:
            del self.requests[model]


def build_report(proxy_id: str, table: RouteCache, tracker: LoadTracker) -> head_pb2.LoadReport:
    """Per model: streams open to each busy replica (ongoing) and requests still without one (queued)."""
    report = head_pb2.LoadReport(proxy_id=proxy_id)
    for model in sorted(set(table.routes) | set(tracker.requests)):
        route = table.routes.get(model)
        replicas = [head_pb2.ReplicaLoad(replica_id=e.replica_id, ongoing=table.inflight(e.address))
                    for e in (route.endpoints if route else ()) if table.inflight(e.address)]
        ongoing = sum(r.ongoing for r in replicas)
        report.models.add(model=model, ongoing=ongoing, queued=max(0, tracker.requests[model] - ongoing),
                          replicas=replicas)
    return report


class LoadReporter:
    """Sends RouteService.ReportLoad every `interval_s` (and at once when `nudge` is called) while it runs."""

    def __init__(self, head_address: str, table: RouteCache, tracker: LoadTracker,
                 interval_s: float = REPORT_INTERVAL_S, limiter=None):
        self.head_address, self.table, self.tracker, self.interval_s = head_address, table, tracker, interval_s
        self.limiter = limiter  # a RateLimiter: reports its keys' use, takes the other proxies' use back
        self.proxy_id = f"{socket.gethostname()}-{os.getpid()}"
        self.failing = False
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        self._nudged.set()

    async def run(self) -> None:
        channel = open_channel(self.head_address, self.table.security)
        stub = head_pb2_grpc.RouteServiceStub(channel)
        try:
            while True:
                await self._send(stub)
                try:
                    await asyncio.wait_for(self._nudged.wait(), self.interval_s)
                except TimeoutError:
                    pass
                self._nudged.clear()
        finally:
            await channel.close()

    async def _send(self, stub: head_pb2_grpc.RouteServiceStub) -> None:
        report = build_report(self.proxy_id, self.table, self.tracker)
        if self.limiter:
            report.key_usage.extend(self.limiter.usage())
        try:
            ack = await stub.ReportLoad(report, timeout=2.0)
        except grpc.aio.AioRpcError as e:
            if not self.failing:  # one line per outage, not one a second
                event(log, "load_report_failed", logging.WARNING, head=self.head_address, code=e.code().name,
                      error=e.details())
            self.failing = True
            return
        if self.failing:
            event(log, "load_report_resumed", head=self.head_address)
        self.failing = False
        if self.limiter:
            self.limiter.absorb(list(ack.others))
