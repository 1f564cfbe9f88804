"""`gridserve simulate`: many simulated schedulers in one process, each speaking the real node protocol to a head."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from gridserve.common.errors import ConfigError
from gridserve.common.eventlog import event
from gridserve.common.grpcutil import NOT_SERVING, SERVING, add_health, bind, make_server
from gridserve.common.model_config import ModelConfig, parse_hostport
from gridserve.common.model_config_proto import config_from_proto
from gridserve.common.service import Stop, run_service
from gridserve.common.security import Security, add_security_args, security_from_args
from gridserve.scheduler.head_link import NodeAgent
from gridserve.scheduler.settings import LOG_LEVELS, SchedulerConfig
from gridserve.replica.engine import Engine
from gridserve.replica.fake_model import load_fake
from gridserve.replica.server import ReplicaService
from gridserve.replica.settings import ReplicaConfig
from gridserve.v1 import head_pb2, model_config_pb2, replica_pb2_grpc

log = logging.getLogger("gridserve.simulate")

S = head_pb2.ReplicaState
ENGINE_THREAD_STACK = 512 * 1024  # 10,000 engine threads in one process: small stacks
# Replica starts in progress at once. A start (gRPC server, engine thread) is milliseconds of work on the
# loop: 5,000 started together would block every node's heartbeat for tens of seconds.
CONCURRENT_STARTS = 16
_starts: asyncio.Semaphore | None = None


def _start_slots() -> asyncio.Semaphore:
    global _starts
    if _starts is None:
        _starts = asyncio.Semaphore(CONCURRENT_STARTS)
    return _starts


_unserved = itertools.count()


@functools.lru_cache(maxsize=64)
@functools.lru_cache(maxsize=64)
def _model_from(serialized: bytes) -> ModelConfig:
    """A validated ModelConfig per distinct config (10,000 replicas of one model convert it once)."""
    return config_from_proto(model_config_pb2.ModelConfig.FromString(serialized))


def _model(msg: model_config_pb2.ModelConfig) -> ModelConfig:
    return _model_from(msg.SerializeToString(deterministic=True))


def serve_fake(spec: head_pb2.ReplicaSpec, server: grpc.aio.Server, host: str, security: Security):
    """Adds the real Replica service to `server`, with a started fake engine (the model's source must be
    fake: a simulated node has no room for weights). Returns the function that stops the engine."""
    model = _model(spec.model_config)
    if model.source.type != "fake":
        raise ConfigError(f"a simulated node runs only fake-engine models; {spec.model!r} is "
                          f"{model.source.describe()}")
    service = ReplicaService(ReplicaConfig(replica_id=spec.replica_id, model=model, host=host, port=0,
                                           port_file=None, num_threads=1, cache_dir=Path("."), security=security))
    engine = Engine(load_fake(model), 1)
    engine.start()
    service.engine = engine
    replica_pb2_grpc.add_ReplicaServicer_to_server(service, server)
    return engine.stop


@dataclass(frozen=True)
class SimulateConfig:
    """Validated flags of `gridserve simulate`."""
    head: str
    nodes: int
    cpus_per_node: float
    gpus_per_node: float = 0.0
    memory_per_node: int = 64 << 30
    node_prefix: str = "sim"
    host: str = "127.0.0.1"
    work_dir: Path = Path(".gridserve/simulate")
    report_interval: float = 1.0
    start_delay: float = 0.2      # seconds a simulated replica spends STARTING before READY
    connect_rate: float = 500.0   # nodes opening their session per second, so a big simulation ramps up
    serve: bool = True            # serve each replica on a real port: health, Generate and Info (fake engine)
    log_level: str = "WARNING"
    security: Security = field(default=Security(), repr=False)

    def __post_init__(self) -> None:
        parse_hostport(self.head)
        if not 1 <= self.nodes <= 100_000:
            raise ConfigError(f"--nodes: must be between 1 and 100000, got {self.nodes}")
        if not 0 < self.cpus_per_node <= 4096:
            raise ConfigError(f"--cpus-per-node: must be in (0, 4096], got {self.cpus_per_node:g}")
        if not 0 <= self.gpus_per_node <= 256:
            raise ConfigError(f"--gpus-per-node: must be in [0, 256], got {self.gpus_per_node:g}")
        if not self.node_prefix or any(c.isspace() for c in self.node_prefix):
            raise ConfigError(f"--node-prefix: must be a non-empty name without spaces, got {self.node_prefix!r}")
        for name, value, lo, hi in (("--report-interval", self.report_interval, 0.05, 60),
                                    ("--start-delay", self.start_delay, 0, 600),
                                    ("--connect-rate", self.connect_rate, 1, 100_000)):
            if not lo <= value <= hi:
                raise ConfigError(f"{name}: must be between {lo:g} and {hi:g}, got {value:g}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level}")

    def node_config(self, index: int) -> SchedulerConfig:
        width = max(4, len(str(self.nodes - 1)))
        return SchedulerConfig(
            head=self.head, node_id=f"{self.node_prefix}-{index:0{width}d}", num_cpus=self.cpus_per_node,
            num_gpus=self.gpus_per_node, memory_bytes=self.memory_per_node, host=self.host,
            advertise_host=self.host, work_dir=self.work_dir, report_interval=self.report_interval,
            log_level=self.log_level, security=self.security)


class SimReplica:
    """One simulated replica: STARTING, then READY after start_delay; with serving, a gRPC server on a real
    port with health and the real Replica service over a fake engine."""

    def __init__(self, spec: head_pb2.ReplicaSpec, host: str, security: Security, changed: Callable[[], None]):
        self.spec, self.replica_id = spec, spec.replica_id
        self.host, self.security, self.changed = host, security, changed
        self.state, self.message, self.address = S.REPLICA_STATE_STARTING, "", ""
        self.state_since = time.time()
        self.server: grpc.aio.Server | None = None
        self.health = None
        self._closer = None
        self.task: asyncio.Task | None = None

    def status(self, node_id: str) -> head_pb2.ReplicaStatus:
        return head_pb2.ReplicaStatus(replica_id=self.replica_id, model=self.spec.model, node_id=node_id,
                                      address=self.address, state=self.state, message=self.message,
                                      state_since=self.state_since)

    def _set(self, state: int, message: str = "") -> None:
        if (state, message) != (self.state, self.message):
            self.state, self.message, self.state_since = state, message, time.time()
            self.changed()

    def start(self, delay: float, serve: bool) -> None:
        self.task = asyncio.create_task(self._start(delay, serve), name=f"sim-replica-{self.replica_id}")

    async def _start(self, delay: float, serve: bool) -> None:
        try:
            if serve:
                async with _start_slots():
                    await self._serve()
            else:  # nothing listens: an address that never resolves (RFC 2606), unique per replica
                self.address = f"{self.replica_id}.sim.invalid:{50000 + next(_unserved) % 10000}"
            await asyncio.sleep(delay)
            if serve:
                await self.health.set("", SERVING)
            self._set(S.REPLICA_STATE_READY)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a model that is not fake, a port that cannot be bound: FAILED, with why
            self._set(S.REPLICA_STATE_FAILED, f"simulated replica could not start: {e}")

    async def _serve(self) -> None:
        """Binds this replica's gRPC server: health, and the Replica service over a started fake engine."""
        await asyncio.sleep(0)  # let sessions run between starts
        self.server = make_server(self.security)
        self.health = add_health(self.server)
        await self.health.set("", NOT_SERVING)
        self._closer = serve_fake(self.spec, self.server, self.host, self.security)
        port = bind(self.server, self.host, 0, self.security)
        await self.server.start()
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.address = f"{host}:{port}"

    async def stop(self) -> None:
        self._set(S.REPLICA_STATE_STOPPING)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        try:
            if self._closer is not None:
                await asyncio.to_thread(self._closer)
        finally:
            if self.server is not None:
                await self.server.stop(0.5)


class SimNode(NodeAgent):
    """A NodeAgent (the real session, reconnects and report pacing) whose replicas are SimReplicas
    instead of processes, and whose report states the node's configured capacity instead of psutil's."""

    def __init__(self, cfg: SchedulerConfig, sim: SimulateConfig):
        super().__init__(cfg)
        self.sim = sim
        self.replicas: dict[str, SimReplica] = {}

    def report(self) -> head_pb2.NodeReport:
        return head_pb2.NodeReport(
            available=head_pb2.Resources(num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus,
                                         memory_bytes=self.cfg.memory_bytes),
            cpu_percent=0.0,
            replicas=[r.status(self.cfg.node_id) for r in (*self.retiring.values(), *self.replicas.values())])

    def converge(self, desired: head_pb2.DesiredState) -> None:
        want = {s.replica_id: s for s in desired.replicas}
        for rid, replica in list(self.replicas.items()):
            spec = want.get(rid)
            if spec is None or spec.model_config != replica.spec.model_config:
                del self.replicas[rid]
                self._stop(replica)
        for rid, spec in want.items():
            if rid not in self.replicas:
                replica = SimReplica(spec, self.cfg.host, self.cfg.security, self.changed)
                self.replicas[rid] = replica
                replica.start(self.sim.start_delay, self.sim.serve)
        self.changed()

    def _stop(self, replica: SimReplica) -> None:
        self.retiring[replica.replica_id] = replica
        task = asyncio.create_task(replica.stop(), name=f"sim-stop-{replica.replica_id}")
        self._stops[replica.replica_id] = task

        def done(_t: asyncio.Task) -> None:
            if self.retiring.get(replica.replica_id) is replica:
                del self.retiring[replica.replica_id]
            self._stops.pop(replica.replica_id, None)
            self.changed()

        task.add_done_callback(done)

    async def stop_all(self) -> None:
        for replica in list(self.replicas.values()):
            del self.replicas[replica.replica_id]
            self._stop(replica)
        if self._stops:
            await asyncio.gather(*self._stops.values(), return_exceptions=True)


class Simulation:
    """N SimNodes sharing one event loop; they open their sessions at `connect_rate` per second."""

    def __init__(self, cfg: SimulateConfig):
        self.cfg = cfg
        self.nodes = [SimNode(cfg.node_config(i), cfg) for i in range(cfg.nodes)]
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        gap = 1.0 / self.cfg.connect_rate
        for node in self.nodes:
            self._tasks.append(asyncio.create_task(node.run(), name=f"sim-session-{node.cfg.node_id}"))
            await asyncio.sleep(gap)

    def counts(self) -> dict[str, int]:
        ready = sum(1 for n in self.nodes for r in n.replicas.values() if r.state == S.REPLICA_STATE_READY)
        return {"nodes_connected": sum(1 for n in self.nodes if n.connected),
                "replicas": sum(len(n.replicas) for n in self.nodes), "ready": ready}

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop_all() for n in self.nodes), return_exceptions=True)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def serve(cfg: SimulateConfig, stop: Stop) -> int:
    threading.stack_size(ENGINE_THREAD_STACK)
    sim = Simulation(cfg)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    event(log, "simulate_started", logging.WARNING, head=cfg.head, nodes=cfg.nodes,
          cpus_per_node=f"{cfg.cpus_per_node:g}", serve=cfg.serve)
    starter = asyncio.create_task(sim.start(), name="sim-start")
    lag = LoopLag()
    ticker = asyncio.create_task(lag.run(), name="sim-loop-lag")
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 10.0)
            event(log, "simulate_progress", logging.WARNING, **sim.counts(), loop_lag_max_ms=lag.take())
        return 0
    finally:
        starter.cancel()
        ticker.cancel()
        await sim.stop()
        loop.remove_signal_handler(signal.SIGUSR1)


class LoopLag:
    """The longest delay of a 0.1 s timer since the last take(): how busy this process's loop is."""

    def __init__(self):
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.1)
            self.worst = max(self.worst, time.monotonic() - t - 0.1)

    def take(self) -> int:
        worst, self.worst = self.worst, 0.0
        return round(worst * 1000)


def dump_tasks() -> None:
    """SIGUSR1: where every session task waits, one line each (what a stuck node is doing)."""
    for task in asyncio.all_tasks():
        if task.get_name().startswith("sim-session-"):
            frames = task.get_stack(limit=8)
            where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
            event(log, "task_stack", logging.WARNING, task=task.get_name(), where=where)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gridserve simulate",
        description="Run N simulated schedulers in one process against a real head: each opens the real node "
                    "session (hello, reports, heartbeats, logs) and runs the replicas the head places as "
                    "in-process fake-engine replicas on real ports, so real proxies can stream from them.")
    p.add_argument("--head", default="127.0.0.1:50051", help="the head's gRPC address (default 127.0.0.1:50051)")
    p.add_argument("--nodes", type=int, required=True, help="how many simulated nodes")
    p.add_argument("--cpus-per-node", type=float, required=True, help="CPUs each simulated node offers")
    p.add_argument("--gpus-per-node", type=float, default=0.0, help="GPUs each simulated node offers (default 0)")
    p.add_argument("--node-prefix", default="sim", help="node ids are PREFIX-0000, PREFIX-0001, ... (default sim)")
    p.add_argument("--host", default="127.0.0.1", help="where the simulated replicas listen (default 127.0.0.1)")
    p.add_argument("--work-dir", type=Path, default=Path(".gridserve/simulate"),
                   help="where replica log requests are looked up (default ./.gridserve/simulate)")
    p.add_argument("--report-interval", type=float, default=1.0,
                   help="seconds between each node's heartbeats (default 1, as a real scheduler)")
    p.add_argument("--start-delay", type=float, default=0.2,
                   help="seconds a simulated replica stays STARTING before READY (default 0.2)")
    p.add_argument("--connect-rate", type=float, default=500.0,
                   help="nodes that open their session per second at start (default 500)")
    p.add_argument("--no-serve", action="store_true",
                   help="bind no ports: replicas report READY at addresses that never resolve "
                        "(<replica>.sim.invalid), so the head and the proxies' route tables carry them at no "
                        "cost to this process; for control-plane experiments, nothing can stream from them")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)
    add_security_args(p)
    return p


def parse_config(argv: list[str] | None = None) -> SimulateConfig:
    a = build_parser().parse_args(argv)
    return SimulateConfig(
        head=a.head, nodes=a.nodes, cpus_per_node=a.cpus_per_node, gpus_per_node=a.gpus_per_node,
        node_prefix=a.node_prefix, host=a.host, work_dir=a.work_dir, report_interval=a.report_interval,
        start_delay=a.start_delay, connect_rate=a.connect_rate, serve=not a.no_serve, log_level=a.log_level,
        security=security_from_args(a))


def main(argv: list[str] | None = None) -> int:
    return run_service("simulate", parse_config, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
