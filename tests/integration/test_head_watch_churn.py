"""RouteService.Watch on a real head under churn: while routes change several times a second, watchers stop
reading, cancel, close their channels, are killed with SIGKILL or frozen with SIGSTOP (and dropped by the head's
keepalive), their writes blocked on tiny flow-control windows. The head stays up (it segfaulted here once:
docs/scale.md), ends every watch, and still serves the current table."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from gridserve.common import grpcutil
from gridserve.common.security import Security
from gridserve.v1 import head_pb2, head_pb2_grpc
from support.cluster import READY, Cluster
from support.waiting import wait_for

NODES, REPLICAS = 10, 200
# A watcher that announces only 1 KiB of window: the head's whole first table (~12 KB) and then every few
# deltas block its writes, so teardowns land while a write is pending, as with a stalled proxy under load.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]

WATCHER_PROCESS = """
import asyncio, sys
from gridserve.common import grpcutil
from gridserve.common.security import Security
from gridserve.v1 import head_pb2, head_pb2_grpc
address, token, streams = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    ch = grpcutil.channel(address, Security(token=token), options=%r)
    calls = [head_pb2_grpc.RouteServiceStub(ch).Watch(head_pb2.WatchRoutesRequest()) for _ in range(streams)]
    for call in calls:
        await call.read()
    print("watching", flush=True)
    await asyncio.sleep(3600)  # reads nothing more
asyncio.run(main())
""" % (SMALL_WINDOW,)


@pytest.fixture(scope="module")
def fake_configs(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "model_configs.json"
    path.write_text(json.dumps({"default_model": "fake", "models": {
        "fake": {"source": {"type": "fake", "tokens_per_second": 100}, "context_length": 512,
                 "max_tokens_limit": 64, "sampling": {"max_new_tokens": 8}, "resources": {"num_cpus": 0.1}}}}))
    return path


def watcher_process(c: Cluster, token: str, streams: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WATCHER_PROCESS, c.grpc_address, token, str(streams)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=c.env)
    assert proc.stdout.readline().strip() == "watching"
    return proc


def churn_routes(c: Cluster, stop: threading.Event) -> None:
    """Scales the deployment down and up by one, over and over: a route change each time."""
    admin = head_pb2_grpc.AdminServiceStub(c._channel)
    for n in itertools.cycle((REPLICAS - 1, REPLICAS)):
        if stop.wait(0.25):
            return
        admin.Scale(head_pb2.ScaleRequest(model="fake", replicas=n), timeout=10, metadata=c.metadata)


async def one_watcher(address: str, security: Security, mode: int) -> None:
    """0: reads one table, stalls, cancels; 1: reads nothing, closes its channel; 2: reads along, cancels."""
    ch = grpcutil.channel(address, security, options=SMALL_WINDOW)
    call = head_pb2_grpc.RouteServiceStub(ch).Watch(head_pb2.WatchRoutesRequest())
    reader = asyncio.ensure_future(_collect(call, set())) if mode == 2 else None
    try:
        if mode == 0:
            await call.read()
        await asyncio.sleep(0.3 if mode == 1 else 0.8)
    finally:
        if reader is not None:
            reader.cancel()
        if mode != 1:
            call.cancel()
        await ch.close(grace=None)


async def churn_watchers(address: str, security: Security, rounds: int, per_round: int) -> int:
    """Opens and tears down `per_round` watchers at once, `rounds` times; returns how many it opened."""
    for r in range(rounds):
        await asyncio.gather(*(one_watcher(address, security, (r + i) % 3) for i in range(per_round)))
    return rounds * per_round


async def versions_seen(address: str, security: Security, stop: asyncio.Event) -> set[int]:
    """A proxy-like watcher that reads everything: the route versions it saw."""
    seen: set[int] = set()
    async with grpcutil.channel(address, security) as ch:
        call = head_pb2_grpc.RouteServiceStub(ch).Watch(head_pb2.WatchRoutesRequest())
        reader = asyncio.ensure_future(_collect(call, seen))
        await stop.wait()
        reader.cancel()
    return seen


async def _collect(call, seen: set[int]) -> None:
    async for table in call:
        seen.add(table.version)


async def watch_churn(address: str, security: Security) -> tuple[int, set[int]]:
    stop = asyncio.Event()
    steady = asyncio.ensure_future(versions_seen(address, security, stop))
    opened = await churn_watchers(address, security, rounds=9, per_round=30)
    stop.set()
    return opened, await steady


def watch_events(log: Path) -> tuple[int, int]:
    text = log.read_text(errors="replace")
    return text.count(" route_watch_started "), text.count(" route_watch_ended ")


def test_the_head_survives_watches_torn_down_mid_write_while_routes_change(tmp_path, fake_configs):
    with Cluster(tmp_path, fake_configs) as c:
        c.start_head(extra=["--no-proxy", "--max-replicas", str(REPLICAS)], wait_for_proxy=False)
        c._spawn("simulate", ["simulate", "--head", c.grpc_address, "--nodes", str(NODES), "--cpus-per-node", "4",
                              "--no-serve", "--report-interval", "0.2", "--cluster-token-file", str(c.token_file)])
        c.cli("deploy", "fake", "--replicas", str(REPLICAS))
        c.wait_ready("fake", REPLICAS, timeout=60)
        token = c.token_file.read_text().strip()
        security = Security(token=token)
        frozen, killed = watcher_process(c, token, 20), watcher_process(c, token, 20)
        stop = threading.Event()
        churn = threading.Thread(target=churn_routes, args=(c, stop), daemon=True)
        churn.start()
        try:
            os.kill(frozen.pid, signal.SIGSTOP)  # the head's keepalive drops it (ping_timeout) in ~10 s
            try:
                opened, seen = asyncio.run(watch_churn(c.grpc_address, security))
            except grpc.aio.AioRpcError:
                assert c.procs["head"].poll() is None, "the head died:\n" + c.logs()[-3000:]
                raise
            killed.kill()
            head_log = tmp_path / "head.log"
            # every watch ended on the head: the churned ones, the killed and the frozen process's, the steady one
            wait_for(lambda: (lambda s, e: s == e and s >= opened + 41)(*watch_events(head_log)), 30,
                     "every watch to end on the head")
        finally:
            stop.set()
            churn.join(15)
            for p in (frozen, killed):
                p.kill()
                p.wait(10)
        assert c.procs["head"].poll() is None, "the head died:\n" + c.logs()[-3000:]
        assert "Fatal Python error" not in (tmp_path / "head.log").read_text(errors="replace")
        assert len(seen) >= 10  # the routes really changed, many times, during the churn
        # the head still serves the current table to a new watcher
        current = c.status().routes_version
        with grpc.insecure_channel(c.grpc_address) as ch:
            first = next(head_pb2_grpc.RouteServiceStub(ch).Watch(head_pb2.WatchRoutesRequest(), timeout=10,
                                                                   metadata=c.metadata))
        assert first.version >= current and len(first.routes[0].endpoints) in (REPLICAS - 1, REPLICAS)
