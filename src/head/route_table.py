"""The routing table: versioned snapshots of deployments and READY endpoints, and their watchers."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_proto
from gridserve.v1 import head_pb2


@dataclass(frozen=True, order=True)
class EndpointKey:
    replica_id: str
    address: str
    node_id: str


@dataclass(frozen=True)
class RouteKey:
    """One route in comparable form: model, its config, its READY endpoints sorted."""
    model: str
    config: ModelConfig
    endpoints: tuple[EndpointKey, ...] = ()


class RouteTable:
    """Holds the current routes; the version bumps only when the routes really change."""

    def __init__(self) -> None:
        self.version = 0
        self._routes: tuple[RouteKey, ...] = ()
        self._changed = asyncio.Event()

    def update(self, routes: list[RouteKey]) -> bool:
        """Replaces the routes; returns True (and wakes every watcher) if they differ from the current ones."""
        canonical = tuple(sorted((RouteKey(r.model, r.config, tuple(sorted(r.endpoints))) for r in routes),
                                 key=lambda r: r.model))
        if canonical == self._routes and self.version:
            return False
        self._routes = canonical
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    def snapshot(self) -> head_pb2.RoutingTable:
        return head_pb2.RoutingTable(version=self.version, routes=[
            head_pb2.Route(model=r.model, model_config=config_to_proto(r.config),
                           endpoints=[head_pb2.Endpoint(replica_id=e.replica_id, address=e.address,
                                                        node_id=e.node_id) for e in r.endpoints])
            for r in self._routes])

    async def watch(self) -> AsyncIterator[head_pb2.RoutingTable]:
        """The current table at once (once there is one: a restarted head holds its first), then the newest
        table after every change (intermediate ones may be skipped by a slow watcher: each is complete)."""
        while not self.version:
            await self._changed.wait()
        while True:
            changed = self._changed
            yield self.snapshot()
            await changed.wait()
