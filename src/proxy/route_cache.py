"""The proxy's routing table: head snapshots, the watcher that keeps them coming, replica channels, p2c picks."""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import grpc

from gridserve.common import grpcutil
from gridserve.common.backoff import Backoff
from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import ConfigError
from gridserve.common.model_config_proto import config_from_proto
from gridserve.common.eventlog import event
from gridserve.common.security import Security
from gridserve.v1 import head_pb2, head_pb2_grpc

log = logging.getLogger("gridserve.proxy.route_cache")

# gRPC's own reconnect backoff grows to 2 minutes by default; a head or replica that comes back
# should be reached within seconds.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 3000),
]


def open_channel(address: str, security: Security | None = None) -> grpc.aio.Channel:
    """A channel with the cluster token (and TLS) and a short reconnect backoff."""
    return grpcutil.channel(address, security, RECONNECT_OPTIONS)


@dataclass(frozen=True)
class Endpoint:
    replica_id: str
    address: str
    node_id: str = ""


@dataclass(frozen=True)
class ModelRoute:
    config: ModelConfig
    endpoints: tuple[Endpoint, ...]


class Lease:
    """One stream's hold on an endpoint: counts as in flight until released (idempotent)."""

    def __init__(self, table: "RouteCache", endpoint: Endpoint, channel: grpc.aio.Channel):
        self.table, self.endpoint, self.channel = table, endpoint, channel
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.table._release(self.endpoint.address)


class RouteCache:
    """What the head last said is deployed and READY, plus per-endpoint in-flight counts and channels
    (which replica gets a request is `replica_picker.py`'s choice)."""

    def __init__(self, rng: random.Random | None = None, security: Security | None = None):
        self.security = security  # what every channel to the head and the replicas carries
        self.version = 0
        self._first = asyncio.Event()   # set when the first snapshot arrives
        self.routes: dict[str, ModelRoute] = {}
        self._inflight: dict[str, int] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task] = set()
        self.rng = rng or random.Random()  # the replica picker's

    @property
    def models(self) -> dict[str, ModelConfig]:
        return {name: r.config for name, r in self.routes.items()}

    @property
    def received(self) -> bool:
        """False until the first snapshot arrives."""
        return self._first.is_set()

    async def wait_received(self, timeout_s: float) -> bool:
        """Waits at most `timeout_s` for the first snapshot; True once it is here."""
        if not self.received:
            try:
                await asyncio.wait_for(self._first.wait(), timeout_s)
            except TimeoutError:
                pass
        return self.received

    def addresses(self) -> set[str]:
        return {e.address for r in self.routes.values() for e in r.endpoints}

    def inflight(self, address: str) -> int:
        return self._inflight.get(address, 0)

    def apply(self, snapshot: head_pb2.RoutingTable, fresh_stream: bool = False) -> bool:
        """Installs a snapshot unless it is older than (or as old as) the one held; True if installed.

        The first snapshot of a new watch stream is the head's current truth and is always
        installed, so a head that restarted with a lower version is not ignored forever.
        """
        if self.received and not fresh_stream and snapshot.version <= self.version:
            event(log, "routes_stale", version=snapshot.version, held=self.version)
            return False
        if snapshot.delta:
            if fresh_stream or not self.received or snapshot.base_version != self.version:
                raise RouteDeltaError(f"a route delta for version {snapshot.base_version} cannot apply to "
                                      f"the held version {self.version}")
            routes = apply_delta(self.routes, snapshot, self._parse_route)
        else:
            routes = {}
            for route in snapshot.routes:
                parsed = self._parse_route(route)
                if parsed is not None:
                    routes[route.model] = parsed
        before = self.addresses()
        self.routes, self.version = routes, snapshot.version
        self._first.set()
        for address in before - self.addresses():
            self._retire(address)
        event(log, "routes_applied", version=self.version, models=len(routes),
              endpoints=sum(len(r.endpoints) for r in routes.values()), delta=snapshot.delta)
        return True

    def _parse_route(self, route: head_pb2.Route) -> ModelRoute | None:
        try:
            config = config_from_proto(route.model_config)
        except ConfigError as e:  # keep what we had for this model rather than drop it
            event(log, "route_invalid", logging.WARNING, model=route.model, error=e.message)
            return self.routes.get(route.model)
        endpoints = tuple(Endpoint(e.replica_id, e.address, e.node_id) for e in route.endpoints if e.address)
        return ModelRoute(config, endpoints)

    def acquire(self, endpoint: Endpoint) -> Lease:
        """Counts a stream as in flight on `endpoint` and hands it the endpoint's (cached) channel."""
        address = endpoint.address
        self._inflight[address] = self.inflight(address) + 1
        return Lease(self, endpoint, self.channel(address))

    def channel(self, address: str) -> grpc.aio.Channel:
        """The cached channel to a replica (opened on first use; closed when it leaves the table)."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address, self.security)
        return channel

    def _release(self, address: str) -> None:
        left = self.inflight(address) - 1
        if left > 0:
            self._inflight[address] = left
            return
        self._inflight.pop(address, None)
        if address not in self.addresses():
            self._retire(address)

    def _retire(self, address: str) -> None:
        """Closes the channel of an endpoint that left the table, once no stream uses it."""
        if self.inflight(address) or address not in self._channels:
            return
        channel = self._channels.pop(address)
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        event(log, "channel_closed", address=address)

    def open_channels(self) -> set[str]:
        return set(self._channels)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(c.close() for c in channels), *self._closing, return_exceptions=True)


class RouteDeltaError(Exception):
    """A delta that does not follow the held table: the watch is opened again for a whole table."""


def apply_delta(routes: dict[str, ModelRoute], delta: head_pb2.RoutingTable, parse) -> dict[str, ModelRoute]:
    """The routes after `delta`: changed routes get their config, lose removed endpoints and gain added ones
    (in place of any with the same replica id); others stay as they are."""
    out = {m: r for m, r in routes.items() if m not in set(delta.removed_models)}
    for route in delta.routes:
        parsed = parse(head_pb2.Route(model=route.model, model_config=route.model_config))
        if parsed is None:
            continue
        gone = set(route.removed_replica_ids)
        added = {e.replica_id: Endpoint(e.replica_id, e.address, e.node_id) for e in route.endpoints if e.address}
        held = out[route.model].endpoints if route.model in out else ()
        kept = [e for e in held if e.replica_id not in gone and e.replica_id not in added]
        out[route.model] = ModelRoute(parsed.config, (*kept, *added.values()))
    return out


class RouteWatcher:
    """Keeps RouteService.Watch open to the head; on a broken stream reconnects with backoff + jitter.

    The table keeps its last snapshot meanwhile, so the proxy goes on serving while the head is away.
    """

    def __init__(self, head_address: str, table: RouteCache,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 5.0):
        self.head_address = head_address
        self.table = table
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.connected = False

    async def run(self) -> None:
        channel = open_channel(self.head_address, self.table.security)
        stub = head_pb2_grpc.RouteServiceStub(channel)
        backoff = Backoff(self.backoff_initial_s, self.backoff_max_s, jitter=0.5)
        try:
            while True:
                if await self._watch_once(stub):
                    backoff.reset()  # the stream worked: the next break is a fresh one
                await asyncio.sleep(backoff.next_delay())
        finally:
            await channel.close()

    async def _watch_once(self, stub: head_pb2_grpc.RouteServiceStub) -> bool:
        """One Watch stream until it breaks; True if it delivered at least one snapshot."""
        call = stub.Watch(head_pb2.WatchRoutesRequest(known_version=self.table.version))
        got_any = False
        try:
            async for snapshot in call:
                try:
                    self.table.apply(snapshot, fresh_stream=not got_any)
                except RouteDeltaError as e:  # out of step: a new watch starts with a whole table
                    event(log, "route_delta_refused", logging.WARNING, error=str(e))
                    return got_any
                if not got_any:
                    got_any, self.connected = True, True
                    event(log, "head_connected", head=self.head_address, version=self.table.version)
            event(log, "head_watch_ended", logging.WARNING, head=self.head_address)
        except grpc.aio.AioRpcError as e:
            level = logging.WARNING if self.connected or got_any else logging.INFO
            event(log, "head_watch_failed", level, head=self.head_address, code=e.code().name,
                  error=e.details(), keeping_version=self.table.version)
        finally:
            call.cancel()
            self.connected = False
        return got_any
