"""The proxy's Embed call against fake replicas on 127.0.0.1: another replica when one is full, gone or mute,
429 when all are full, a bad request not retried; /v1/embeddings counts in the autoscaler's load and is held
while its model is at zero replicas."""
from __future__ import annotations

import asyncio
import itertools

import aiohttp
import pytest
from aiohttp import web

from gridserve.common import grpcutil
from gridserve.common.errors import InvalidRequest, Overloaded, Unavailable
from gridserve.proxy.embeddings import call_embed
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.relay import ProxyState
from gridserve.proxy.retry import RetryPolicy
from gridserve.proxy.route_cache import RouteCache
from gridserve.proxy.server import make_app
from gridserve.proxy.zero_hold import ZeroHold
from gridserve.v1 import head_pb2, model_config_pb2, replica_pb2, replica_pb2_grpc
from support.waiting import wait_until
from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_proto

pytestmark = pytest.mark.timeout(30)
POLICY = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05, accept_timeout_s=0.5)
CONFIG = config_to_proto(ModelConfig.from_dict("emb", {"task": "embedding", "source": {"type": "local", "path": "/m"},
                                                      "context_length": 64}))
_versions = itertools.count(1)
AT_ZERO = model_config_pb2.ModelConfig()
AT_ZERO.CopyFrom(CONFIG)
AT_ZERO.autoscaling.CopyFrom(model_config_pb2.Autoscaling(min_replicas=0, max_replicas=2, target_ongoing_requests=1,
                                                          upscale_delay_s=30, downscale_delay_s=60,
                                                          look_back_period_s=10))


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


def snapshot_of(config, *reps) -> head_pb2.RoutingTable:
    snapshot = head_pb2.RoutingTable(version=next(_versions))
    route = snapshot.routes.add(model="emb", model_config=config)
    for r in reps:
        route.endpoints.add(replica_id=r.replica_id, address=r.address, node_id="n1")
    return snapshot


@pytest.fixture
async def proxy_at_zero():
    """The proxy app in-process with `emb` autoscaled to zero (no replica), a 1.5 s hold, and nudges counted."""
    table, nudges = RouteCache(), []
    table.apply(snapshot_of(AT_ZERO))
    state = ProxyState(table, routes_wait_s=0.1)
    state.zero_hold = ZeroHold(timeout_s=1.5, max_held=4, on_hold=lambda: nudges.append(1))
    runner = web.AppRunner(make_app(state))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{runner.addresses[0][1]}") as http:
        yield state, http, nudges
    await runner.cleanup()
    await table.close()


async def test_an_embeddings_request_at_zero_is_held_and_counted_as_load_then_served(proxy_at_zero):
    state, http, nudges = proxy_at_zero
    replica = await FakeEmbedder("emb-a00001", "ok").start()
    try:
        held = asyncio.create_task(http.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"]}))
        await wait_until(lambda: state.zero_hold.held["emb"] == 1, 5, "the request held")
        assert state.load.requests["emb"] == 1 and nudges == [1]  # the head hears of the demand at once
        state.table.apply(snapshot_of(AT_ZERO, replica))  # a replica became READY
        async with await held as r:
            assert r.status == 200 and len((await r.json())["data"]) == 2
        assert replica.calls == 1 and not state.load.requests and not state.zero_hold.held
    finally:
        await replica.server.stop(None)


async def test_an_embeddings_request_held_too_long_gets_503_with_retry_after(proxy_at_zero):
    state, http, _ = proxy_at_zero
    async with http.post("/v1/embeddings", json={"model": "emb", "input": "a"}) as r:
        body = await r.json()
        assert r.status == 503 and r.headers["Retry-After"] == "5"
    assert body["error"]["code"] == "model_starting" and "scaled to zero" in body["error"]["message"]
    assert not state.load.requests and not state.zero_hold.held
