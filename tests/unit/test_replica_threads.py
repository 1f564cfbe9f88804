"""A replica's torch threads follow its share of the node: the scheduler tells a running replica its new
count over gRPC (SetThreads) and the engine thread applies it between steps."""
from __future__ import annotations

import asyncio
import dataclasses
import threading

import grpc
import pytest

from gridserve.common.grpcutil import bind, channel, make_server
from gridserve.common.request_contract import SamplingOptions
from gridserve.replica.engine import Engine
from gridserve.replica.llama_runner import LlamaRunner
from gridserve.replica.server import ReplicaService
from gridserve.replica.settings import ReplicaConfig
from gridserve.scheduler.replica_supervisor import ReplicaRunner
from gridserve.scheduler.settings import parse_config
from gridserve.v1 import head_pb2, replica_pb2, replica_pb2_grpc


async def wait_threads(engine: Engine, n: int) -> None:
    for _ in range(200):
        if engine.stats().num_threads == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine runs {engine.stats().num_threads} threads, not {n}")


async def generate(engine: Engine, n: int = 4) -> list[int]:
    out = []
    async for o in engine.submit("t", [1, 2, 3], SamplingOptions(max_tokens=n)).outputs():
        out.extend(o.token_ids)
    return out


async def test_the_engine_thread_applies_a_new_thread_count_between_steps(tiny_loaded):
    seen = []

    class Runner(LlamaRunner):
        def thread_setup(self, num_threads: int) -> int:
            seen.append(threading.current_thread().name)
            return super().thread_setup(num_threads)

    engine = Engine(tiny_loaded, num_threads=2, runner=Runner(tiny_loaded.model, tiny_loaded.device, 2, 256))
    engine.start()
    try:
        before = await generate(engine)
        await wait_threads(engine, 2)
        engine.set_threads(1)
        await wait_threads(engine, 1)  # an idle engine applies it at once, not at the next request
        assert await generate(engine) == before
        assert seen == ["engine", "engine"]  # torch's count is set in the thread that runs the model
    finally:
        await asyncio.to_thread(engine.stop)


@pytest.fixture
async def served(tiny_loaded, tmp_path):
    engine = Engine(tiny_loaded, num_threads=2)
    engine.start()
    service = ReplicaService(ReplicaConfig(replica_id="r1", model=tiny_loaded.config, host="127.0.0.1", port=0,
                                           port_file=None, num_threads=2, cache_dir=tmp_path))
    service.engine = engine
    server = make_server()
    replica_pb2_grpc.add_ReplicaServicer_to_server(service, server)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        yield engine, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        await asyncio.to_thread(engine.stop)


async def test_a_running_replica_gets_its_new_share_when_replicas_join_or_leave_the_node(served, tmp_path):
    engine, address = served
    replicas_on_node = 1
    cfg = parse_config(["--head", "127.0.0.1:1", "--num-cpus", "2", "--work-dir", str(tmp_path / "node")])
    runner = ReplicaRunner(head_pb2.ReplicaSpec(replica_id="r1", model="tiny"), cfg, lambda: None,
                           node_replicas=lambda: replicas_on_node)
    runner.num_threads = 2  # what it was spawned with, alone on the node
    async with channel(address) as ch:
        stub = replica_pb2_grpc.ReplicaStub(ch)
        await runner.retune(ch)
        assert (runner.num_threads, (await stub.Info(replica_pb2.InfoRequest())).num_threads) == (2, 2)
        replicas_on_node = 2  # another replica started on this node: one core each
        await runner.retune(ch)
        await wait_threads(engine, 1)
        assert runner.num_threads == (await stub.Info(replica_pb2.InfoRequest())).num_threads == 1
        replicas_on_node = 1  # it left again
        await runner.retune(ch)
        await wait_threads(engine, 2)
        fixed = ReplicaRunner(head_pb2.ReplicaSpec(replica_id="r1", model="tiny"),
                              dataclasses.replace(cfg, threads_per_replica=1), lambda: None,
                              node_replicas=lambda: replicas_on_node)
        fixed.num_threads = 1  # --threads-per-replica 1: the count stays fixed whatever the share
        await fixed.retune(ch)
        assert engine.stats().num_threads == 2 and fixed.num_threads == 1
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.SetThreads(replica_pb2.SetThreadsRequest(num_threads=0))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
