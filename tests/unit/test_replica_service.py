"""The replica's Generate handler with the real engine: a stream closed by gRPC at a yield (how a client
cancel reaches a handler that is producing fast) is logged as cancelled and frees its engine row."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gridserve.replica.settings import ReplicaConfig
from gridserve.replica.engine import Engine
from gridserve.replica.server import ReplicaService
from gridserve.v1 import replica_pb2


class Context:
    """What Generate uses of a grpc.aio ServicerContext."""

    def __init__(self) -> None:
        self.metadata = None

    async def send_initial_metadata(self, metadata) -> None:
        self.metadata = metadata


@pytest.fixture
async def service(tiny_loaded):
    engine = Engine(tiny_loaded, num_threads=1)
    engine.start()
    svc = ReplicaService(ReplicaConfig(replica_id="tiny-svc", model=tiny_loaded.config, host="127.0.0.1", port=0,
                                       port_file=None, num_threads=1, cache_dir=Path("/tmp")))
    svc.engine = engine
    yield svc
    await asyncio.to_thread(engine.stop)


async def test_a_stream_closed_at_a_yield_is_logged_cancelled_and_frees_its_row(service, caplog):
    request = replica_pb2.GenerateRequest(request_id="closed-early", prompt="Once upon a time",
                                          params=replica_pb2.SamplingParams(max_tokens=100))
    context = Context()
    stream = service.Generate(request, context)
    with caplog.at_level(logging.INFO, logger="gridserve.replica"):
        await anext(stream)
        await anext(stream)
        await stream.aclose()  # GeneratorExit at the yield, not CancelledError
    assert dict(context.metadata) == {"x-gridserve-accepted": "1"}
    done = [r.getMessage() for r in caplog.records if "generate_done" in r.getMessage()]
    assert len(done) == 1 and "request_id=closed-early finish=cancelled" in done[0]
    for _ in range(100):
        if service.engine.stats().running == 0:
            break
        await asyncio.sleep(0.02)
    assert service.engine.stats().running == 0
