"""The proxy's Embed call against fake replicas on 127.0.0.1: another replica when one is full, gone or mute,
429 when all are full, a bad request not retried."""
from __future__ import annotations

import asyncio
import itertools

import pytest

from gridserve.common import grpcutil
from gridserve.common.errors import InvalidRequest, Overloaded, Unavailable
from gridserve.proxy.embeddings import call_embed
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.retry import RetryPolicy
from gridserve.proxy.route_cache import RouteCache
from gridserve.v1 import head_pb2, replica_pb2, replica_pb2_grpc
from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_proto

pytestmark = pytest.mark.timeout(30)
POLICY = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05, accept_timeout_s=0.5)
CONFIG = config_to_proto(ModelConfig.from_dict("emb", {"task": "embedding", "source": {"type": "local", "path": "/m"},
                                                      "context_length": 64}))
_versions = itertools.count(1)


class FakeEmbedder(replica_pb2_grpc.ReplicaServicer):
    """Embed by `mode`: "full" (RESOURCE_EXHAUSTED), "gone" (UNAVAILABLE), "invalid", "mute" (never accepts),
    else accepts and answers one 2-d vector per input."""

    def __init__(self, replica_id: str, mode: str):
        self.replica_id, self.mode, self.calls = replica_id, mode, 0

    async def start(self) -> "FakeEmbedder":
        self.server = grpcutil.make_server()
        replica_pb2_grpc.add_ReplicaServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{grpcutil.bind(self.server, '127.0.0.1', 0)}"
        await self.server.start()
        return self

    async def Embed(self, request, context):
        self.calls += 1
        errors = {"full": Overloaded("replica is full"), "gone": Unavailable("replica is shutting down"),
                  "invalid": InvalidRequest("input[0] is 300 tokens")}
        if self.mode in errors:
            raise errors[self.mode]
        if self.mode == "mute":
            await asyncio.sleep(30)
        await context.send_initial_metadata((("x-gridserve-accepted", "1"),))
        yield replica_pb2.EmbedResponse(embeddings=[replica_pb2.Embedding(values=[1.0, 0.0]) for _ in request.inputs],
                                        prompt_tokens=3 * len(request.inputs), dimensions=2)


@pytest.fixture
async def serve():
    started, tables = [], []

    async def make(*modes: str) -> tuple[RouteCache, list[FakeEmbedder]]:
        reps = [await FakeEmbedder(f"emb-{i:06d}", m).start() for i, m in enumerate(modes)]
        started.extend(reps)
        table = RouteCache()
        tables.append(table)
        snapshot = head_pb2.RoutingTable(version=next(_versions))
        route = snapshot.routes.add(model="emb", model_config=CONFIG)
        for r in reps:
            route.endpoints.add(replica_id=r.replica_id, address=r.address, node_id="n1")
        table.apply(snapshot)
        return table, reps

    yield make
    for t in tables:
        await t.close()
    await asyncio.gather(*(r.server.stop(None) for r in started))


@pytest.mark.parametrize("bad", ["full", "gone", "mute"])
async def test_a_full_gone_or_mute_replica_is_passed_over_for_another(serve, bad):
    table, (first, second) = await serve(bad, "ok")
    table.rng.seed(0)
    for _ in range(4):  # whichever the pick tries first, the answer comes from the good one
        reply, endpoint = await call_embed(table, "emb", replica_pb2.EmbedRequest(inputs=["a", "b"]), POLICY)
        assert endpoint.replica_id == second.replica_id and len(reply.embeddings) == 2 and reply.prompt_tokens == 6
    assert first.calls >= 1  # it was tried (the seeded pick tries it first at least once)
    assert table.inflight(first.address) == table.inflight(second.address) == 0


async def test_every_replica_full_is_a_429_and_a_bad_request_is_not_retried(serve):
    table, reps = await serve("full", "full")
    with pytest.raises(HttpError) as caught:
        await call_embed(table, "emb", replica_pb2.EmbedRequest(inputs=["a"]), POLICY)
    assert caught.value.status == 429 and all(r.calls >= 1 for r in reps)
    table, (bad,) = await serve("invalid")
    with pytest.raises(HttpError) as caught:
        await call_embed(table, "emb", replica_pb2.EmbedRequest(inputs=["a"]), POLICY)
    assert caught.value.status == 400 and "300 tokens" in caught.value.message and bad.calls == 1
