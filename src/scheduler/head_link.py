"""The scheduler's link to the head: one NodeService session (hello, reports, logs), reconnects, convergence."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

import grpc
import psutil

from gridserve.common.backoff import Backoff
from gridserve.common.grpcutil import channel
from gridserve.common.eventlog import event
from gridserve.common.security import call_metadata
from gridserve.scheduler.settings import SchedulerConfig
from gridserve.scheduler.hf_cache import cached_models
from gridserve.scheduler.log_streams import LogStreams
from gridserve.scheduler.model_pull import ModelPulls
from gridserve.scheduler.replica_supervisor import ReplicaRunner
from gridserve.v1 import head_pb2, head_pb2_grpc

log = logging.getLogger("gridserve.scheduler")

FIRST_RECONNECT = 0.5
MAX_RECONNECT = 2.0  # a restarted head waits 2x its --node-timeout for nodes: reconnect well within it
STABLE_SESSION = 10.0  # a session that lasted this long resets the reconnect backoff
# The head answers a hello at once. Without an answer in this time the link is not there (writes are
# only queued while gRPC is still connecting, and a cut link can keep it connecting for minutes).
SESSION_OPEN_TIMEOUT = 10.0
CACHE_SCAN_INTERVAL = 30.0  # the HF cache is rescanned this often, and after each pull


class NodeAgent:
    """Registers this machine, reports its replicas, and converges them to each DesiredState.
    A lost head never stops replicas: the agent reconnects and the head adopts what runs."""

    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.replicas: dict[str, ReplicaRunner] = {}
        self.retiring: dict[str, ReplicaRunner] = {}
        self._stops: dict[str, asyncio.Task] = {}
        self._changed = asyncio.Event()
        self.connected = False
        self.desired_version = 0
        self.cached: list[head_pb2.CachedModel] = []  # the HF cache's models, for reports
        self._rescan = asyncio.Event()
        self._pulls: ModelPulls | None = None
        psutil.cpu_percent(None)  # primes the counter: later calls measure since the previous one

    def changed(self) -> None:
        self._changed.set()

    # messages

    def hello(self) -> head_pb2.NodeHello:
        return head_pb2.NodeHello(
            node_id=self.cfg.node_id, hostname=socket.gethostname(), address=self.cfg.advertise_host,
            capacity=head_pb2.Resources(num_cpus=self.cfg.num_cpus, num_gpus=self.cfg.num_gpus,
                                        memory_bytes=self.cfg.memory_bytes))

    def report(self) -> head_pb2.NodeReport:
        cpu = psutil.cpu_percent(None)
        logical = psutil.cpu_count() or 1
        runners = {**self.retiring, **self.replicas}
        return head_pb2.NodeReport(
            available=head_pb2.Resources(num_cpus=round(logical * (100.0 - cpu) / 100.0, 2),
                                         num_gpus=self.cfg.num_gpus,
                                         memory_bytes=psutil.virtual_memory().available),
            cpu_percent=cpu,
            replicas=[r.status(self.cfg.node_id) for r in runners.values()],
            cached_models=self.cached)

    # convergence

    def converge(self, desired: head_pb2.DesiredState) -> None:
        """Starts replicas that are wanted and missing, stops the ones no longer wanted (or whose config changed)."""
        want = {s.replica_id: s for s in desired.replicas}
        for rid, runner in list(self.replicas.items()):
            spec = want.get(rid)
            if spec is None or spec.model_config != runner.spec.model_config:
                self._retire(runner, "not desired" if spec is None else "config changed")
        for rid, spec in want.items():
            if rid not in self.replicas:
                runner = ReplicaRunner(spec, self.cfg, self.changed, node_replicas=lambda: len(self.replicas))
                self.replicas[rid] = runner
                runner.start(after=self._stops.get(rid))
                event(log, "replica_added", replica=rid, model=spec.model, version=desired.version)
        self.changed()

    def _retire(self, runner: ReplicaRunner, reason: str) -> None:
        rid = runner.replica_id
        del self.replicas[rid]
        self.retiring[rid] = runner
        event(log, "replica_retiring", replica=rid, reason=reason)
        task = asyncio.create_task(runner.stop(), name=f"stop-{rid}")
        self._stops[rid] = task

        def done(_t: asyncio.Task) -> None:
            if self.retiring.get(rid) is runner:
                del self.retiring[rid]
            if self._stops.get(rid) is task:
                del self._stops[rid]
            self.changed()

        task.add_done_callback(done)

    async def stop_all(self) -> None:
        """Stops every local replica (at shutdown), concurrently."""
        for runner in list(self.replicas.values()):
            self._retire(runner, "scheduler stopping")
        tasks = list(self._stops.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # the session

    async def run(self) -> None:
        """Keeps a session with the head open, reconnecting with exponential backoff and jitter."""
        backoff = Backoff(FIRST_RECONNECT, MAX_RECONNECT, jitter=0.5, stable_s=STABLE_SESSION)
        while True:
            started = time.monotonic()
            try:
                await self._session()
                reason = "the head ended the session"
            except asyncio.TimeoutError:
                reason = f"no answer to the hello within {SESSION_OPEN_TIMEOUT:g}s"
            except grpc.aio.AioRpcError as e:
                reason = f"{e.code().name}: {e.details()}"
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    event(log, "head_refused_token", logging.ERROR, head=self.cfg.head,
                          hint="pass the head's token with --cluster-token-file (its state dir holds it)")
            except asyncio.CancelledError:
                # gRPC raises CancelledError from a call cancelled under it (a channel torn down while the
                # link broke): that is a failed session, not this task being stopped, so reconnect.
                if asyncio.current_task().cancelling():
                    raise
                reason = "the session's call was cancelled under it"
            except Exception as e:  # noqa: BLE001 - anything else the session raises must not end reconnecting
                reason = f"{type(e).__name__}: {e}"
                log.warning("session_failed", exc_info=True)
            finally:
                self.connected = False
            delay = backoff.next_delay(time.monotonic() - started)
            event(log, "head_disconnected", logging.WARNING, head=self.cfg.head, reason=reason,
                  retry_in_s=f"{delay:.2f}", replicas_kept=len(self.replicas))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        async with channel(self.cfg.head, self.cfg.security) as ch:
            call = head_pb2_grpc.NodeServiceStub(ch).Session(metadata=call_metadata(self.cfg.security))
            logs = LogStreams(self.cfg.work_dir)
            self._pulls = ModelPulls(self.cfg.node_id, logs.outbox, on_done=self._rescan.set)
            scanner = asyncio.create_task(self._scan_cache(), name="hf-cache-scan")
            try:
                first = await self._open_within(call, SESSION_OPEN_TIMEOUT)
                if first is grpc.aio.EOF:
                    return
                self.connected = True
                self._handle(first, logs)
                event(log, "head_connected", head=self.cfg.head, node=self.cfg.node_id,
                      replicas=len(self.replicas))
                reader = asyncio.create_task(self._read(call, logs))
                sender = asyncio.create_task(self._send(call, logs.outbox))
                try:
                    done, _ = await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (reader, sender):
                        t.cancel()
                    await asyncio.gather(reader, sender, return_exceptions=True)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()
            finally:
                call.cancel()
                scanner.cancel()
                await self._pulls.close()
                await logs.close()

    async def _open_within(self, call, timeout: float):
        """_open with a time limit. On timeout the call is cancelled first, so the pending write or read
        fails at once: cancelling only the task can wait on gRPC for as long as the link is down."""
        opening = asyncio.ensure_future(self._open(call))
        done, _ = await asyncio.wait({opening}, timeout=timeout)
        if not done:
            call.cancel()
            opening.cancel()
            await asyncio.wait({opening}, timeout=1.0)
            raise asyncio.TimeoutError
        return opening.result()

    async def _open(self, call):
        """Sends the hello and a first report; returns the head's first answer (or EOF)."""
        await call.write(head_pb2.NodeMessage(hello=self.hello()))
        await call.write(head_pb2.NodeMessage(report=self.report()))
        return await call.read()

    async def _read(self, call, logs: LogStreams) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            self._handle(msg, logs)

    def _handle(self, msg: head_pb2.HeadMessage, logs: LogStreams) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "desired":
            self.desired_version = msg.desired.version
            event(log, "desired_received", version=msg.desired.version, replicas=len(msg.desired.replicas))
            self.converge(msg.desired)
        elif kind == "log_request":
            logs.open(msg.log_request)
        elif kind == "log_cancel":
            logs.cancel(msg.log_cancel.stream_id)
        elif kind == "model_pull" and self._pulls is not None:
            self._pulls.open(msg.model_pull)
        elif kind == "model_pull_cancel" and self._pulls is not None:
            self._pulls.cancel(msg.model_pull_cancel.stream_id)

    async def _scan_cache(self) -> None:
        """Keeps `cached` (the HF cache's models) current: now, after each pull, and every CACHE_SCAN_INTERVAL."""
        while True:
            self._rescan.clear()
            found = await asyncio.to_thread(cached_models)
            if found != self.cached:
                self.cached = found
                self.changed()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), CACHE_SCAN_INTERVAL)

    async def _send(self, call, outbox: asyncio.Queue) -> None:
        """Writes log chunks as they come and a report on every change and at least every report_interval
        (one writer: a gRPC stream takes one write at a time)."""
        getter: asyncio.Future | None = None
        last = time.monotonic()
        try:
            while True:
                getter = getter or asyncio.ensure_future(outbox.get())
                changed = asyncio.ensure_future(self._changed.wait())
                timeout = max(0.0, self.cfg.report_interval - (time.monotonic() - last))
                try:
                    done, _ = await asyncio.wait({getter, changed}, timeout=timeout,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if getter in done:
                    msg, getter = getter.result(), None
                    await call.write(msg)
                if self._changed.is_set() or time.monotonic() - last >= self.cfg.report_interval:
                    self._changed.clear()
                    last = time.monotonic()
                    await call.write(head_pb2.NodeMessage(report=self.report()))
        finally:
            if getter is not None:
                getter.cancel()
