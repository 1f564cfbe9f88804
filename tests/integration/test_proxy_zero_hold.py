"""Scale to zero on the real proxy: a request for a model at zero waits for its first replica, bounded by a
queue limit and a timeout (503 with Retry-After, never a hang); /ready counts a model at zero as ready."""
import asyncio
import json

import aiohttp
import pytest

from gridserve.v1 import head_pb2, model_config_pb2
from support.fakes import FakeHead, FakeReplica, Proxy, model_config, wait_version
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

ZERO = model_config("idle")
ZERO.autoscaling.CopyFrom(model_config_pb2.Autoscaling(min_replicas=0, max_replicas=2, target_ongoing_requests=2,
                                                       upscale_delay_s=30, downscale_delay_s=5, look_back_period_s=30))
_version = iter(range(10_000, 20_000))


def publish_zero(head: FakeHead, *replicas: FakeReplica) -> int:
    table = head_pb2.RoutingTable(version=next(_version))
    route = table.routes.add(model="idle", model_config=ZERO)
    for r in replicas:
        route.endpoints.add(replica_id=r.replica_id, address=r.address, node_id="n1")
    head.current = table
    for q in head.queues:
        q.put_nowait(table)
    return table.version


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory):
    head = await FakeHead().start()
    proxy = await Proxy(head.port, tmp_path_factory.mktemp("zero"),
                        extra=("--zero-hold-timeout", "1.5", "--zero-hold-max", "2")).start()
    async with aiohttp.ClientSession() as http:
        await wait_version(http, proxy, publish_zero(head))
        yield head, proxy, http
    await proxy.stop()
    await head.server.stop(None)


def holds(proxy) -> int:
    """How many requests the proxy has held so far (its request_held log lines)."""
    return proxy.log_path.read_text().count("request_held ")


async def held(proxy, before: int, n: int) -> None:
    """Until n more requests than `before` are held (not a guessed delay: the hold's timeout is short)."""
    await wait_until(lambda: holds(proxy) >= before + n, 10, f"{n} held request(s)")


async def chat(http, proxy):
    async with http.post(f"{proxy.url}/v1/chat/idle", data="hi") as r:
        return r.status, r.headers, await r.text()


async def test_a_model_at_zero_is_ready_and_listed(cluster):
    _, proxy, http = cluster
    async with http.get(f"{proxy.url}/ready") as r:
        assert r.status == 200 and await r.json() == {"status": "ready", "models": {"idle": 0},
                                                      "scaled_to_zero": ["idle"]}
    async with http.get(f"{proxy.url}/v1/models") as r:
        assert [(m["id"], m["ready_replicas"]) for m in (await r.json())["data"]] == [("idle", 0)]


async def test_a_held_request_times_out_with_503_and_retry_after(cluster):
    _, proxy, http = cluster
    started = asyncio.get_running_loop().time()
    status, headers, body = await chat(http, proxy)
    waited = asyncio.get_running_loop().time() - started
    assert status == 503 and headers["Retry-After"] == "5" and 1.4 < waited < 10
    assert "scaled to zero and no replica became ready within 1.5s" in json.loads(body)["error"]["message"]


async def test_requests_over_the_hold_limit_get_503_at_once(cluster):
    _, proxy, http = cluster
    before = holds(proxy)
    waiting = [asyncio.create_task(chat(http, proxy)) for _ in range(2)]
    await held(proxy, before, 2)
    status, headers, body = await chat(http, proxy)
    assert status == 503 and "2 requests already wait" in body and headers["Retry-After"] == "1"
    assert [s for s, _, _ in await asyncio.gather(*waiting)] == [503, 503]


async def test_a_held_request_is_served_once_a_replica_is_ready(cluster):
    head, proxy, http = cluster
    replica = await FakeReplica("idle-a00001").start()
    try:
        before = holds(proxy)
        waiting = asyncio.create_task(chat(http, proxy))
        await held(proxy, before, 1)
        assert not waiting.done()
        publish_zero(head, replica)
        status, _, text = await waiting
        assert status == 200 and text == "Hello, world!"
    finally:
        await wait_version(http, proxy, publish_zero(head))
        await replica.server.stop(None)
