"""Cluster gauges for /metrics: nodes and replicas from the head's Status, queue depth, batch size and prefix
cache counts from each READY replica's Info, polled every few seconds (every second while the dashboard
watches) and served from the last poll, to /metrics and the dashboard alike."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gridserve.common.eventlog import event
from gridserve.proxy.route_cache import RouteCache, open_channel
from gridserve.v1 import head_pb2, head_pb2_grpc, replica_pb2, replica_pb2_grpc

log = logging.getLogger("gridserve.proxy.request_metrics")

RPC_TIMEOUT_S = 2.0
WATCHED_FOR_S = 10.0  # after the dashboard asked for fresh data, polls come every fast_interval this long
MAX_INFOS_PER_POLL = 256
STATES = [name.removeprefix("REPLICA_STATE_") for name in head_pb2.ReplicaState.keys()
          if name != "REPLICA_STATE_UNSPECIFIED"]


def _field(info: replica_pb2.InfoResponse, name: str) -> float | None:
    """An Info field by name, or None on a replica (or proto) that does not have it."""
    return getattr(info, name) if name in info.DESCRIPTOR.fields_by_name else None


class ClusterCollector(Collector):
    """Builds the gauges from the last poll at scrape time, so replicas that are gone leave no stale series."""

    def __init__(self) -> None:
        self.head_up = False
        self.polled_at = 0.0
        self.status: head_pb2.ClusterStatus | None = None
        self.infos: dict[str, replica_pb2.InfoResponse] = {}

    def describe(self):
        return []  # registering must not trigger a collect

    def collect(self):
        yield GaugeMetricFamily("gridserve_head_up", "1 if the last Status poll of the head succeeded",
                                value=1.0 if self.head_up else 0.0)
        if self.status is not None:
            yield from self._cluster(self.status)
        yield from self._replicas()

    @staticmethod
    def _cluster(st: head_pb2.ClusterStatus):
        nodes = GaugeMetricFamily("gridserve_cluster_nodes", "Nodes the head knows, by alive", labels=["alive"])
        alive = sum(1 for n in st.nodes if n.alive)
        nodes.add_metric(["true"], alive)
        nodes.add_metric(["false"], len(st.nodes) - alive)
        yield nodes
        counts = {(d.model, s): 0 for d in st.deployments for s in STATES}
        for r in st.replicas:
            key = (r.model, head_pb2.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_"))
            counts[key] = counts.get(key, 0) + 1
        replicas = GaugeMetricFamily("gridserve_cluster_replicas", "Replicas by model and state",
                                     labels=["model", "state"])
        for (model, state), n in sorted(counts.items()):
            replicas.add_metric([model, state], n)
        yield replicas
        desired = GaugeMetricFamily("gridserve_deployment_desired_replicas", "Replicas each deployment wants",
                                    labels=["model"])
        for d in st.deployments:
            desired.add_metric([d.model], d.replicas)
        yield desired
        yield from ClusterCollector._memory(st)

    @staticmethod
    def _memory(st: head_pb2.ClusterStatus):
        """Each running replica's RSS, GPU memory and limit, and each alive node's total and free memory."""
        labels = ["model", "replica", "node"]
        rss = GaugeMetricFamily("gridserve_replica_memory_rss_bytes", "Resident memory of the replica's process "
                                "(with its children), measured by its scheduler", labels=labels)
        gpu = GaugeMetricFamily("gridserve_replica_gpu_memory_bytes", "GPU memory the replica's process holds "
                                "(0 without a GPU)", labels=labels)
        limit = GaugeMetricFamily("gridserve_replica_memory_limit_bytes", "The model's resources.memory_mb: past it "
                                  "the scheduler stops and restarts the replica", labels=labels)
        for r in st.replicas:
            if r.rss_bytes:
                key = [r.model, r.replica_id, r.node_id]
                rss.add_metric(key, r.rss_bytes)
                gpu.add_metric(key, r.gpu_bytes)
                if r.memory_limit_bytes:
                    limit.add_metric(key, r.memory_limit_bytes)
        total = GaugeMetricFamily("gridserve_node_memory_total_bytes", "Memory of each alive node", labels=["node"])
        free = GaugeMetricFamily("gridserve_node_memory_available_bytes", "Memory each alive node last reported "
                                 "available (psutil)", labels=["node"])
        for n in st.nodes:
            if n.alive:
                total.add_metric([n.node_id], n.capacity.memory_bytes)
                free.add_metric([n.node_id], n.available.memory_bytes)
        yield from (rss, gpu, limit, total, free)

    def _replicas(self):
        labels = ["model", "replica"]
        queue = GaugeMetricFamily("gridserve_replica_queue_depth", "Requests waiting for a batch row (Info.waiting)",
                                  labels=labels)
        batch = GaugeMetricFamily("gridserve_replica_batch_size", "Requests in the running batch (Info.running)",
                                  labels=labels)
        mean = GaugeMetricFamily("gridserve_replica_mean_batch_size", "Rows per forward pass over the last few "
                                 "seconds (Info.mean_batch_size, where the replica reports it)", labels=labels)
        stall = GaugeMetricFamily("gridserve_replica_seconds_since_step", "With work queued or running: seconds "
                                  "since the engine's last step, 0 idle (Info.seconds_since_step; health goes "
                                  "NOT_SERVING past the model's stall_timeout_s)", labels=labels)
        for rid, info in sorted(self.infos.items()):
            queue.add_metric([info.model, rid], info.waiting)
            size = _field(info, "batch_size")
            batch.add_metric([info.model, rid], info.running if size is None else size)
            if (value := _field(info, "mean_batch_size")) is not None:
                mean.add_metric([info.model, rid], value)
            stall.add_metric([info.model, rid], info.seconds_since_step)
        yield from (queue, batch, mean, stall)
        yield from self._prefix_cache(labels)

    def _prefix_cache(self, labels: list[str]):
        """The engines' prompt tokens served from the prefix cache and computed, since each replica started
        (its id is new after a restart): the hit rate is cached / (cached + prefilled)."""
        cached = CounterMetricFamily("gridserve_replica_prompt_tokens_cached", "Prompt tokens whose keys and values "
                                     "the replica's prefix cache held (Info.prompt_tokens_cached_total)", labels=labels)
        prefilled = CounterMetricFamily("gridserve_replica_prompt_tokens_prefilled", "Prompt tokens the replica's "
                                        "model computed (Info.prompt_tokens_prefilled_total)", labels=labels)
        for rid, info in sorted(self.infos.items()):
            hits, computed = _field(info, "prompt_tokens_cached_total"), _field(info, "prompt_tokens_prefilled_total")
            if hits is not None and computed is not None:
                cached.add_metric([info.model, rid], hits)
                prefilled.add_metric([info.model, rid], computed)
        yield from (cached, prefilled)


class ClusterPoller:
    """Every `interval` seconds (--metrics-interval), and every `fast_interval` while someone watches (the
    dashboard calls `fresh`): the head's Status and the Info of every READY replica in the route table."""

    def __init__(self, head_address: str, table: RouteCache, collector: ClusterCollector, interval: float,
                 on_poll: Callable[[], None] = lambda: None, fast_interval: float = 1.0):
        self.head_address = head_address
        self.table = table
        self.collector = collector
        self.interval, self.fast_interval = interval, min(interval, fast_interval)
        self.on_poll = on_poll
        self._cursor = 0
        self._watched_until = 0.0   # monotonic time until which polls come every fast_interval
        self._wake = asyncio.Event()  # poll now, without waiting out the interval
        self._next = asyncio.Event()  # set when the next poll is done

    async def run(self) -> None:
        channel = open_channel(self.head_address, self.table.security)
        try:
            while True:
                self._wake.clear()
                await self.poll_once(head_pb2_grpc.AdminServiceStub(channel))
                watched = time.monotonic() < self._watched_until
                try:
                    await asyncio.wait_for(self._wake.wait(), self.fast_interval if watched else self.interval)
                except TimeoutError:
                    pass
        finally:
            await channel.close()

    async def fresh(self, max_age_s: float) -> None:
        """Polls every fast_interval for the next WATCHED_FOR_S seconds; when the last poll is older than
        `max_age_s`, waits for a new one (a few seconds at most: a slow head must not hang the caller)."""
        watched, self._watched_until = time.monotonic() < self._watched_until, time.monotonic() + WATCHED_FOR_S
        if not watched:
            self._wake.set()  # out of the long wait: the next poll now, then every fast_interval
        if time.time() - self.collector.polled_at <= max_age_s:
            return
        done = self._next
        self._wake.set()
        try:
            await asyncio.wait_for(done.wait(), 2 * RPC_TIMEOUT_S + 1)
        except TimeoutError:
            pass

    async def poll_once(self, head: head_pb2_grpc.AdminServiceStub) -> None:
        c = self.collector
        try:
            c.status, c.head_up = await head.Status(head_pb2.StatusRequest(), timeout=RPC_TIMEOUT_S), True
        except grpc.aio.AioRpcError as e:
            if c.head_up:
                event(log, "metrics_status_failed", logging.WARNING, head=self.head_address, code=e.code().name)
            c.status, c.head_up = None, False
        endpoints = [e for route in self.table.routes.values() for e in route.endpoints]
        asked = self._next_batch(endpoints)
        infos = await asyncio.gather(*(self._info(e.address) for e in asked))
        live = {e.replica_id for e in endpoints}
        answered = {e.replica_id: info for e, info in zip(asked, infos)}
        c.infos = {rid: info for rid, info in {**c.infos, **answered}.items() if rid in live and info is not None}
        c.polled_at = time.time()
        done, self._next = self._next, asyncio.Event()
        done.set()
        self.on_poll()

    def _next_batch(self, endpoints: list) -> list:
        """Every endpoint when there are few; beyond MAX_INFOS_PER_POLL, the next that many in turn (10 proxies
        asking 10,000 replicas every 5 s would be 20,000 RPCs a second for a gauge)."""
        if len(endpoints) <= MAX_INFOS_PER_POLL:
            return endpoints
        start = self._cursor % len(endpoints)
        self._cursor = start + MAX_INFOS_PER_POLL
        return (endpoints + endpoints)[start:start + MAX_INFOS_PER_POLL]

    async def _info(self, address: str) -> replica_pb2.InfoResponse | None:
        try:
            stub = replica_pb2_grpc.ReplicaStub(self.table.channel(address))
            return await stub.Info(replica_pb2.InfoRequest(), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return None
