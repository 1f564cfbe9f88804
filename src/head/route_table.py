"""The routing table: versioned snapshots of deployments and READY endpoints, and their watchers."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, NamedTuple

from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_proto
from gridserve.head.route_delta import route_delta
from gridserve.v1 import head_pb2


class EndpointKey(NamedTuple):
    """A READY endpoint in comparable form (a tuple: 10,000 of them sort and compare in C)."""
    replica_id: str
    address: str
    node_id: str


class RouteKey(NamedTuple):
    """One route in comparable form: model, its config, its READY endpoints sorted."""
    model: str
    config: ModelConfig
    endpoints: tuple[EndpointKey, ...] = ()


class RouteTable:
    """Holds the current routes; the version bumps only when the routes really change."""

    def __init__(self) -> None:
        self.version = 0
        self.changed_at = time.monotonic()  # when the version last changed
        self._routes: tuple[RouteKey, ...] = ()
        self._changed = asyncio.Event()
        self._snapshot: head_pb2.RoutingTable | None = None
        self._deltas: dict[tuple[int, int], head_pb2.RoutingTable] = {}

    def update(self, routes: list[RouteKey]) -> bool:
        """Replaces the routes; returns True (and wakes every watcher) if they differ from the current ones."""
        canonical = tuple(sorted((RouteKey(r.model, r.config, tuple(sorted(r.endpoints))) for r in routes),
                                 key=lambda r: r.model))
        if canonical == self._routes and self.version:
            return False
        self._routes = canonical
        self.version += 1
        self.changed_at = time.monotonic()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    def endpoint_count(self) -> int:
        return sum(len(r.endpoints) for r in self._routes)

    def snapshot(self) -> head_pb2.RoutingTable:
        """The current table as a message, built once per version and shared by every watcher (do not change it)."""
        if self._snapshot is None or self._snapshot.version != self.version:
            self._snapshot = self._build()
        return self._snapshot

    def _build(self) -> head_pb2.RoutingTable:
        return head_pb2.RoutingTable(version=self.version, routes=[
            head_pb2.Route(model=r.model, model_config=config_to_proto(r.config),
                           endpoints=[head_pb2.Endpoint(replica_id=e.replica_id, address=e.address,
                                                        node_id=e.node_id) for e in r.endpoints])
            for r in self._routes])

    async def watch(self, deltas: bool = True) -> AsyncIterator[head_pb2.RoutingTable]:
        """The current table at once (once there is one: a restarted head holds its first), then after every
        change the newest table (intermediate ones may be skipped by a slow watcher) as a delta against the
        one this stream sent last, or whole when `deltas` is off."""
        while not self.version:
            await self._changed.wait()
        sent: tuple[int, tuple] | None = None
        while True:
            changed, current = self._changed, (self.version, self._routes)
            yield self.snapshot() if sent is None or not deltas else self.delta(*sent)
            sent = current
            await changed.wait()

    def delta(self, base_version: int, base_routes: tuple) -> head_pb2.RoutingTable:
        """The delta from a table sent earlier to the current one, computed once for every watcher."""
        key = (base_version, self.version)
        out = self._deltas.get(key)
        if out is None:
            out = route_delta(base_routes, self._routes, base_version, self.version)
            if len(self._deltas) >= 32:
                self._deltas.pop(next(iter(self._deltas)))
            self._deltas[key] = out
        return out
