"""The proxy's /metrics, scraped with prometheus-client's parser: counters move by exactly the requests made."""
import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gridserve.v1 import head_pb2 as pb
from support.fakes import FakeHead, FakeReplica, Proxy, publish
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def head():
    h = await FakeHead().start()
    h.status = pb.ClusterStatus(
        nodes=[pb.NodeStatus(node_id="n1", alive=True, capacity=pb.Resources(memory_bytes=8 << 30),
                             available=pb.Resources(memory_bytes=5 << 30)),
               pb.NodeStatus(node_id="n2", alive=False)],
        deployments=[pb.DeploymentStatus(model="tiny", replicas=2, ready=1)],
        replicas=[pb.ReplicaStatus(replica_id="tiny-m00001", model="tiny", node_id="n1", state=pb.REPLICA_STATE_READY,
                                   rss_bytes=400 << 20, memory_limit_bytes=1200 << 20),
                  pb.ReplicaStatus(replica_id="tiny-m00009", model="tiny", state=pb.REPLICA_STATE_FAILED)])
    yield h
    await h.server.stop(None)


@pytest.fixture(scope="module")
async def proxy(head, tmp_path_factory):
    p = await Proxy(head.port, tmp_path_factory.mktemp("proxy"), extra=("--metrics-interval", "0.5")).start()
    yield p
    await p.stop()


async def scrape(http, proxy) -> dict:
    """{(sample name, frozenset of labels): value} of one /metrics scrape."""
    async with http.get(f"{proxy.url}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def hold(proxy) -> asyncio.StreamWriter:
    """A stream that stays open on the replica (its first chunk read), making that replica the busier one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/tiny HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nhold")
    await writer.drain()
    assert b"first" in await asyncio.wait_for(reader.readuntil(b"first"), 10)
    return writer


async def test_counters_move_by_the_requests_made_and_cluster_gauges_come_from_status_and_info(proxy, head):
    good = await FakeReplica("tiny-m00001").start()
    down = await FakeReplica("tiny-m00002", mode="unavailable").start()
    good.running, good.waiting, good.seconds_since_step = 2, 3, 1.5
    good.prompt_tokens_cached, good.prompt_tokens_prefilled = 1200, 345
    async with aiohttp.ClientSession() as http:
        try:
            await publish(http, proxy, head, tiny=[good])
            before = await scrape(http, proxy)
            for _ in range(2):
                async with http.post(f"{proxy.url}/v1/chat/tiny", data="hi") as r:
                    assert r.status == 200 and await r.read()
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with http.post(f"{proxy.url}/v1/chat/completions", json=chat) as r:
                assert r.status == 200 and await r.read()
            async with http.post(f"{proxy.url}/v1/completions", json={"model": "nope", "prompt": "x"}) as r:
                assert r.status == 404
            holder = await hold(proxy)
            await publish(http, proxy, head, tiny=[good, down])
            async with http.post(f"{proxy.url}/v1/completions", json={"model": "tiny", "prompt": "x"}) as r:
                assert r.status == 200 and r.headers["X-Replica-Id"] == "tiny-m00001"
            assert len(down.requests) == 1  # the idle replica was tried first, then the busy good one
            during = await scrape(http, proxy)
            holder.close()
            async def polled():  # a metrics poll of the head and both replicas after the held stream ended
                after = await scrape(http, proxy)
                done = value(after, "gridserve_streams_in_flight", model="tiny") == 0
                down_polled = ("gridserve_replica_prompt_tokens_cached_total",
                               frozenset({("model", "tiny"), ("replica", "tiny-m00002")})) in after
                return after if done and down_polled and value(after, "gridserve_head_up") == 1 and value(
                    after, "gridserve_replica_batch_size", model="tiny", replica="tiny-m00001") == 2 else None
            after = await wait_until(polled, 10, "a metrics poll after the held stream")
        finally:
            await asyncio.gather(good.server.stop(None), down.server.stop(None))

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("gridserve_requests_total", api="chat", model="tiny", status="200") == 3  # with the held one
    assert moved("gridserve_requests_total", api="chat.completions", model="tiny", status="200") == 1
    assert moved("gridserve_requests_total", api="completions", model="tiny", status="200") == 1
    assert moved("gridserve_requests_total", api="completions", model="unknown", status="404") == 1
    assert moved("gridserve_generated_tokens_total", model="tiny") == 4 * 4 + 1
    assert moved("gridserve_prompt_tokens_total", model="tiny") == 3 * 4
    assert moved("gridserve_time_to_first_token_seconds_count", model="tiny") == 5
    assert moved("gridserve_inter_token_latency_seconds_count", model="tiny") == 3 * 4
    assert moved("gridserve_upstream_retries_total", model="tiny") == 1
    for outcome in ("resumed", "failed"):  # created at 0 by the poll, before any failover
        assert value(after, "gridserve_failovers_total", model="tiny", outcome=outcome) == 0
        assert ("gridserve_failovers_total", frozenset({("model", "tiny"), ("outcome", outcome)})) in after
    assert value(during, "gridserve_streams_in_flight", model="tiny") == 1
    assert value(after, "gridserve_streams_in_flight", model="tiny") == 0

    assert value(after, "gridserve_head_up") == 1
    assert value(after, "gridserve_cluster_nodes", alive="true") == 1
    assert value(after, "gridserve_cluster_nodes", alive="false") == 1
    assert value(after, "gridserve_cluster_replicas", model="tiny", state="READY") == 1
    assert value(after, "gridserve_cluster_replicas", model="tiny", state="FAILED") == 1
    assert ("gridserve_cluster_replicas", frozenset({("model", "tiny"), ("state", "STARTING")})) in after
    assert value(after, "gridserve_deployment_desired_replicas", model="tiny") == 2
    mine = {"model": "tiny", "replica": "tiny-m00001", "node": "n1"}
    assert value(after, "gridserve_replica_memory_rss_bytes", **mine) == 400 << 20
    assert value(after, "gridserve_replica_memory_limit_bytes", **mine) == 1200 << 20
    assert ("gridserve_replica_gpu_memory_bytes", frozenset(mine.items())) in after
    assert not [k for k in after if k[0] == "gridserve_replica_memory_rss_bytes" and ("replica", "tiny-m00009") in k[1]]
    assert value(after, "gridserve_node_memory_total_bytes", node="n1") == 8 << 30
    assert value(after, "gridserve_node_memory_available_bytes", node="n1") == 5 << 30
    assert value(after, "gridserve_replica_queue_depth", model="tiny", replica="tiny-m00001") == 3
    assert value(after, "gridserve_replica_batch_size", model="tiny", replica="tiny-m00001") == 2
    assert value(after, "gridserve_replica_batch_size", model="tiny", replica="tiny-m00002") == 0
    assert value(after, "gridserve_replica_seconds_since_step", model="tiny", replica="tiny-m00001") == 1.5
    assert value(after, "gridserve_replica_prompt_tokens_cached_total", model="tiny", replica="tiny-m00001") == 1200
    assert value(after, "gridserve_replica_prompt_tokens_prefilled_total", model="tiny", replica="tiny-m00001") == 345
    assert ("gridserve_replica_prompt_tokens_cached_total",  # a replica that has served nothing says 0
            frozenset({("model", "tiny"), ("replica", "tiny-m00002")})) in after
