"""One local replica process: spawn it, learn its port, probe its health, restart it with backoff or give up."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import grpc

from gridserve.common.backoff import Backoff
from gridserve.common.model_config_proto import config_from_proto, config_to_arg
from gridserve.common.errors import GridserveError, Unavailable
from gridserve.common.files import read_port_file
from gridserve.common.grpcutil import SERVING, channel, check_health
from gridserve.common.eventlog import event
from gridserve.common.paths import WorkDir
from gridserve.common.procs import stop_async, tied_child_env
from gridserve.common.service import cancel_and_wait, ExitCode
from gridserve.scheduler.download_watch import DownloadWatch
from gridserve.scheduler.replica_memory import GpuMemory, over_limit, process_rss
from gridserve.scheduler.settings import SchedulerConfig
from gridserve.v1 import head_pb2, replica_pb2, replica_pb2_grpc

log = logging.getLogger("gridserve.scheduler")

S = head_pb2.ReplicaState
CRASH_LIMIT = 5          # more crashes than this within CRASH_WINDOW -> FAILED
CRASH_WINDOW = 60.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
UNHEALTHY_AFTER = 3      # consecutive failed probes of a live process
STARTING_PROBE = 0.25    # probe faster until READY, so readiness is reported quickly
MESSAGE_LIMIT = 600
DRAIN_POLL = 0.25        # seconds between Info polls of a draining replica


def tail_message(log_path: Path, offset: int = 0, lines: int = 3) -> str:
    """What went wrong, from a replica's log after `offset`: its last `fatal:` line, else its last lines."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            start = max(offset, f.tell() - 16384)
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    rows = [r.strip() for r in text.splitlines() if r.strip()]
    fatal = [r for r in rows if r.startswith("fatal:")]
    msg = fatal[-1] if fatal else " | ".join(rows[-lines:])
    return msg[-MESSAGE_LIMIT:]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with code {code}"


class CrashWindow:
    """Counts crashes in a sliding window; `add` says whether the limit is now exceeded."""

    def __init__(self, limit: int = CRASH_LIMIT, window: float = CRASH_WINDOW):
        self.limit, self.window = limit, window
        self.times: collections.deque[float] = collections.deque()

    def add(self, now: float) -> bool:
        self.times.append(now)
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        return len(self.times) > self.limit


def restart_backoff() -> Backoff:
    """1 s, 2 s, 4 s ... 30 s between restarts; a process that ran longer than CRASH_WINDOW starts over."""
    return Backoff(FIRST_BACKOFF, MAX_BACKOFF, stable_s=CRASH_WINDOW)


def replica_threads(model_cpus: float, node_cpus: float, node_replicas: int) -> int:
    """Torch threads for a replica: the CPUs its model reserves, or its even share of the node's CPUs
    when that is more, so a lone replica on a 2-core node runs 2 threads and no core sits idle, while
    replicas sharing a node do not oversubscribe it (each takes its share when it starts)."""
    share = int(node_cpus // max(1, node_replicas))
    return max(1, math.ceil(model_cpus), share)


class ReplicaRunner:
    """Keeps one replica (spec from the head) running on this node and tracks its state."""

    def __init__(self, spec: head_pb2.ReplicaSpec, cfg: SchedulerConfig, on_change: Callable[[], None],
                 node_replicas: Callable[[], int] = lambda: 1):
        self.node_replicas = node_replicas  # how many replicas this node runs now (for the thread share)
        self.spec = spec
        self.replica_id = spec.replica_id
        self.cfg = cfg
        self.on_change = on_change
        self.state = S.REPLICA_STATE_PENDING
        self.state_since = time.time()
        self.message = ""
        self.address = ""
        self.port = 0  # the current process's port, for probes and the drain
        self.pid = 0
        self.restarts = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False
        self.kill_reason = ""  # why the scheduler killed the current process (a hung replica)
        self.rss_bytes = self.gpu_bytes = self.memory_limit = 0  # memory_limit: resources.memory_mb in bytes
        self.download: head_pb2.ModelDownload | None = None  # HF cache progress while STARTING
        self.model_cpus = 1.0  # the model's resources.num_cpus
        self.num_threads = 0   # torch threads the running process was given (at spawn, or by SetThreads since)
        self.gpu = GpuMemory(cfg.num_gpus)
        self.last_restart = ""  # why the process was last restarted, kept in status after the restart
        self.hub_source: tuple[str, str] | None = None  # (repo, revision) of a hub model, for the download watch
        work = WorkDir(cfg.work_dir)
        self.log_path = work.replica_log(self.replica_id)
        self.port_file = work.replica_port(self.replica_id)

    # state

    def _set(self, state: int, message: str | None = None) -> None:
        if message is None:
            message = self.message
        if state == self.state and message == self.message:
            return
        if state != self.state:
            self.state_since = time.time()
        self.state, self.message = state, message
        event(log, "replica_state", logging.WARNING if state in (S.REPLICA_STATE_FAILED, S.REPLICA_STATE_UNHEALTHY)
              else logging.INFO, replica=self.replica_id, state=S.Name(state).removeprefix("REPLICA_STATE_"),
              pid=self.pid, address=self.address, restarts=self.restarts, message=message)
        self.on_change()

    def status(self, node_id: str) -> head_pb2.ReplicaStatus:
        return head_pb2.ReplicaStatus(
            replica_id=self.replica_id, model=self.spec.model, node_id=node_id, address=self.address,
            state=self.state, pid=self.pid, restarts=self.restarts, message=self.message,
            state_since=self.state_since, rss_bytes=self.rss_bytes, gpu_bytes=self.gpu_bytes,
            memory_limit_bytes=self.memory_limit, last_restart=self.last_restart,
            download=self.download if self.state == S.REPLICA_STATE_STARTING else None)

    # lifecycle

    def start(self, after: asyncio.Task | None = None) -> None:
        self.task = asyncio.create_task(self._supervise(after), name=f"replica-{self.replica_id}")

    async def stop(self) -> None:
        """Ends supervision (no restart from here on), drains a READY replica, then SIGTERM, grace, SIGKILL."""
        self.stopping = True
        drain = self.state == S.REPLICA_STATE_READY and self.port
        self._set(S.REPLICA_STATE_STOPPING, "draining in-flight streams" if drain else "")
        await cancel_and_wait(self.task)
        if self.proc is not None and self.proc.returncode is None:
            if drain:
                await self._drain()
            code = await stop_async(self.proc, self.cfg.stop_grace)
            event(log, "replica_stopped", replica=self.replica_id, pid=self.pid, code=code)

    async def _drain(self) -> None:
        """Waits up to --drain-grace until the replica runs and queues nothing (twice in a row). The head
        took it out of the routes before asking for the stop, so its open streams end and no new ones come."""
        started = time.monotonic()
        idle = failures = 0
        async with channel(f"{_bracket(self.cfg.probe_host)}:{self.port}", self.cfg.security) as ch:
            stub = replica_pb2_grpc.ReplicaStub(ch)
            while idle < 2 and failures < 3 and time.monotonic() - started < self.cfg.drain_grace:
                try:
                    info = await stub.Info(replica_pb2.InfoRequest(), timeout=2.0)
                    failures, idle = 0, (idle + 1 if info.running + info.waiting == 0 else 0)
                except grpc.aio.AioRpcError:
                    failures += 1  # gone or hung: nothing to wait for
                if idle < 2 and self.proc is not None and self.proc.returncode is None:
                    await asyncio.sleep(DRAIN_POLL)
        event(log, "replica_drained", replica=self.replica_id, pid=self.pid, idle=idle >= 2,
              waited_s=f"{time.monotonic() - started:.1f}")

    async def _supervise(self, after: asyncio.Task | None) -> None:
        if after is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await after
        try:
            config = config_from_proto(self.spec.model_config)
        except GridserveError as e:
            self._set(S.REPLICA_STATE_FAILED, f"bad model config from the head: {e.message}")
            return
        self.model_cpus = config.resources.num_cpus
        self.memory_limit = config.resources.memory_mb * 2**20
        self.hub_source = (config.source.repo, config.source.revision) if config.source.type == "hub" else None
        crashes, backoff = CrashWindow(), restart_backoff()
        while not self.stopping:
            started = time.monotonic()
            code, offset = await self._run_once(self.threads())
            if self.stopping:
                return
            tail = tail_message(self.log_path, offset)
            if self.kill_reason:
                tail, self.kill_reason = f"{self.kill_reason}; log: {tail}", ""
            if code == ExitCode.FATAL:
                self._set(S.REPLICA_STATE_FAILED, tail or f"fatal error ({describe_exit(code)})")
                return
            if crashes.add(time.monotonic()):
                self._set(S.REPLICA_STATE_FAILED, f"crash loop: {len(crashes.times)} exits within "
                          f"{CRASH_WINDOW:g}s, gave up; last: {describe_exit(code)}: {tail}")
                return
            delay = backoff.next_delay(time.monotonic() - started)
            self.restarts += 1
            why = f"{describe_exit(code)}; restart in {delay:g}s: {tail}"
            self.last_restart = f"{describe_exit(code)}: {tail}"[:MESSAGE_LIMIT]
            self._set(S.REPLICA_STATE_RESTARTING, why[:MESSAGE_LIMIT])
            await asyncio.sleep(delay)

    def threads(self) -> int:
        """Torch threads this replica should run now: --threads-per-replica, else its share of the node."""
        return self.cfg.threads_per_replica or replica_threads(self.model_cpus, self.cfg.num_cpus, self.node_replicas())

    async def retune(self, ch: grpc.aio.Channel) -> None:
        """Tell a READY replica its new thread count when its share of the node changed since it started
        (replicas joined or left), so the node never runs more torch threads than it has cores for long.
        A failed call is retried at the next probe; a replica without the call keeps its count."""
        want = self.threads()
        if want == self.num_threads:
            return
        try:
            await replica_pb2_grpc.ReplicaStub(ch).SetThreads(replica_pb2.SetThreadsRequest(num_threads=want),
                                                              timeout=self.cfg.probe_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                return
            event(log, "replica_threads_unchanged", replica=self.replica_id, num_threads=self.num_threads,
                  wanted=want, reason="the replica has no SetThreads call")
        else:
            event(log, "replica_threads", replica=self.replica_id, pid=self.pid, was=self.num_threads, num_threads=want)
        self.num_threads = want

    def _command(self, num_threads: int) -> list[str]:
        cmd = [*self.cfg.replica_command, "--replica-id", self.replica_id,
               "--model-config", config_to_arg(config_from_proto(self.spec.model_config)), "--host", self.cfg.host,
               "--port", str(pick_port(self.cfg.host, *self.cfg.port_range)),
               "--port-file", str(self.port_file), "--num-threads", str(num_threads),
               *self.cfg.security.child_args()]
        if self.cfg.cache_dir:
            cmd += ["--cache-dir", self.cfg.cache_dir]
        return cmd

    async def _run_once(self, num_threads: int) -> tuple[int | None, int]:
        """Runs the process until it exits; returns its exit code and where its log output began."""
        self.port_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        self.num_threads = num_threads
        with open(self.log_path, "ab") as logf:
            offset = logf.tell()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self._command(num_threads), stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                    stderr=asyncio.subprocess.STDOUT, process_group=0, env=tied_child_env())
            except (OSError, Unavailable) as e:
                self._set(S.REPLICA_STATE_RESTARTING, f"cannot start {self.cfg.replica_command[0]}: {e}")
                return None, offset
        self.pid, self.address = self.proc.pid, ""
        self._set(S.REPLICA_STATE_STARTING, "")
        event(log, "replica_spawned", replica=self.replica_id, pid=self.pid, log=self.log_path)
        prober = asyncio.create_task(self._probe())
        watcher = asyncio.create_task(self._watch())
        try:
            code = await self.proc.wait()
        finally:
            for task in (prober, watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.address, self.pid, self.port = "", 0, 0
        self.rss_bytes = self.gpu_bytes = 0
        self.download = None
        return code, offset

    async def _probe(self) -> None:
        """Waits for the port file, then probes grpc.health.v1 until cancelled; kills a hung replica."""
        while (port := read_port_file(self.port_file)) is None:
            await asyncio.sleep(0.05)
        self.address, self.port = f"{_bracket(self.cfg.advertise_host)}:{port}", port
        self.on_change()
        watch = HangWatch(self.cfg.unhealthy_grace)
        failures = 0
        async with channel(f"{_bracket(self.cfg.probe_host)}:{port}", self.cfg.security) as ch:
            while True:
                try:
                    status = await check_health(ch, timeout=self.cfg.probe_timeout)
                    failures = 0
                    self._set(S.REPLICA_STATE_READY if status == SERVING else S.REPLICA_STATE_STARTING, "")
                except grpc.aio.AioRpcError as e:
                    failures += 1
                    if failures >= UNHEALTHY_AFTER:
                        self._set(S.REPLICA_STATE_UNHEALTHY,
                                  f"{failures} health probes failed: {e.code().name} {e.details() or ''}".strip())
                if reason := watch.check(self.state, time.monotonic()):
                    self._kill_hung(reason)
                    return
                ready = self.state == S.REPLICA_STATE_READY
                if ready:
                    await self.retune(ch)
                await asyncio.sleep(self.cfg.probe_interval if ready else min(STARTING_PROBE, self.cfg.probe_interval))

    async def _watch(self) -> None:
        """Every probe interval while the process runs: its RSS and GPU memory; SIGKILL past resources.memory_mb
        (restarted through the same backoff); while STARTING, how far a hub model's download has come."""
        downloads = DownloadWatch(*self.hub_source) if self.hub_source else None
        if downloads is not None:
            downloads.start()
        try:
            while True:
                self.rss_bytes, self.gpu_bytes = process_rss(self.pid), self.gpu.get(self.pid)
                if reason := over_limit(self.rss_bytes, self.memory_limit):
                    self._kill_over_memory(reason)
                    return
                if downloads is not None:
                    progress = downloads.sample() if self.state == S.REPLICA_STATE_STARTING else None
                    if progress != self.download:
                        self.download = progress
                        self.on_change()
                await asyncio.sleep(self.cfg.probe_interval)
        finally:
            if downloads is not None:
                downloads.stop()

    def _kill_over_memory(self, reason: str) -> None:
        """SIGKILL a replica past its memory limit before the machine runs out; _supervise restarts it."""
        self.kill_reason = reason
        event(log, "replica_over_memory", logging.WARNING, replica=self.replica_id, pid=self.pid, reason=reason)
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def _kill_hung(self, reason: str) -> None:
        """SIGKILL (a stopped or wedged process ignores SIGTERM); _supervise restarts it with backoff."""
        self.kill_reason = f"hung, killed by the scheduler: {reason}"
        event(log, "replica_hung", logging.WARNING, replica=self.replica_id, pid=self.pid, reason=reason)
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class HangWatch:
    """Says when a replica has been hung for `grace` seconds: UNHEALTHY (probes fail while the process
    lives), or NOT_SERVING again after it was READY (a replica that stopped serving without exiting)."""

    def __init__(self, grace: float):
        self.grace = grace
        self.was_ready = False
        self.bad_since: float | None = None

    def check(self, state: int, now: float) -> str:
        if state == S.REPLICA_STATE_READY:
            self.was_ready, self.bad_since = True, None
            return ""
        bad = state == S.REPLICA_STATE_UNHEALTHY or (self.was_ready and state == S.REPLICA_STATE_STARTING)
        if not bad:
            self.bad_since = None
            return ""
        if self.bad_since is None:
            self.bad_since = now
        if now - self.bad_since < self.grace:
            return ""
        what = "unhealthy" if state == S.REPLICA_STATE_UNHEALTHY else "not serving after it was ready"
        return f"{what} for {now - self.bad_since:.0f}s (--unhealthy-grace {self.grace:g})"


def pick_port(host: str, low: int, high: int) -> int:
    """A free port in [low, high] on host (0 when no range is set: the replica picks one itself).
    Another process may take it before the replica binds; the replica then exits and is restarted."""
    if (low, high) == (0, 0):
        return 0
    for port in random.sample(range(low, high + 1), high - low + 1):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    raise Unavailable(f"no free port in --port-range {low}-{high} on {host}")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
