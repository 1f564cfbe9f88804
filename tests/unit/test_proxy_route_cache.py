"""Proxy routing table: snapshot application (stale versions too), p2c picking, channel lifetimes, the head watcher."""
import asyncio
import random

from gridserve.common import grpcutil
from gridserve.common.model_config import ModelConfig
import pytest

from gridserve.common.model_config_proto import config_to_proto
from gridserve.proxy.replica_picker import power_of_two_choices
from gridserve.proxy.route_cache import RouteCache, RouteDeltaError, RouteWatcher
from gridserve.v1 import head_pb2, head_pb2_grpc
from support.waiting import wait_until as wait_for


def model_config(name: str):
    return config_to_proto(ModelConfig.from_dict(name, {"source": {"type": "local", "path": "/x"},
                                                        "context_length": 128, "max_tokens_limit": 32,
                                                        "sampling": {"max_new_tokens": 16}}))


def snapshot(version: int, **models: list[str]) -> head_pb2.RoutingTable:
    """A RoutingTable with model -> list of endpoint addresses (replica id = model-<port>)."""
    table = head_pb2.RoutingTable(version=version)
    for name, addresses in models.items():
        route = table.routes.add(model=name, model_config=model_config(name))
        for a in addresses:
            route.endpoints.add(replica_id=f"{name}-{a.rsplit(':', 1)[1]}", address=a, node_id="n1")
    return table


def addresses(table: RouteCache, model: str) -> list[str]:
    return [e.address for e in table.routes[model].endpoints]


def test_snapshot_is_applied_with_configs_and_endpoints():
    table = RouteCache()
    assert not table.received and power_of_two_choices(table, "m") is None
    assert table.apply(snapshot(3, m=["h:1", "h:2"], empty=[]))
    assert table.received and table.version == 3
    assert addresses(table, "m") == ["h:1", "h:2"] and addresses(table, "empty") == []
    assert table.models["m"].context_length == 128 and table.models["m"].max_tokens_limit == 32
    assert table.routes["m"].endpoints[0].replica_id == "m-1"


def test_older_and_equal_versions_are_ignored_on_the_same_stream():
    table = RouteCache()
    table.apply(snapshot(5, m=["h:1"]))
    assert not table.apply(snapshot(4, m=["h:9"]))
    assert not table.apply(snapshot(5, m=["h:9"]))
    assert table.version == 5 and addresses(table, "m") == ["h:1"]
    assert table.apply(snapshot(6, m=["h:2"]))
    assert addresses(table, "m") == ["h:2"]


def test_first_snapshot_of_a_fresh_stream_wins_even_with_a_lower_version():
    table = RouteCache()
    table.apply(snapshot(50, m=["h:1"]))
    assert table.apply(snapshot(2, m=["h:7"]), fresh_stream=True)  # the head restarted its counter
    assert table.version == 2 and addresses(table, "m") == ["h:7"]


def test_a_delta_adds_replaces_and_removes_endpoints_and_models_and_must_follow_the_held_version():
    table = RouteCache()
    table.apply(snapshot(5, m=["h:1", "h:2"], gone=["g:1"]))
    delta = snapshot(7, m=["h:3", "h9:9"])
    delta.delta, delta.base_version = True, 6
    with pytest.raises(RouteDeltaError):  # it follows version 6, the proxy holds 5: a new watch is needed
        table.apply(delta)
    delta.base_version = 5
    delta.routes[0].endpoints[1].replica_id = "m-2"  # m-2 moved to h9:9
    delta.routes[0].removed_replica_ids.append("m-1")
    delta.removed_models.append("gone")
    assert table.apply(delta)
    assert table.version == 7 and set(table.routes) == {"m"}
    assert sorted(addresses(table, "m")) == ["h9:9", "h:3"]


def test_removed_model_disappears_and_bad_config_keeps_the_previous_route():
    table = RouteCache()
    table.apply(snapshot(1, a=["h:1"], b=["h:2"]))
    broken = snapshot(2, a=["h:3"])
    broken.routes[0].model_config.max_tokens_limit = 0
    broken.routes.add(model="c").model_config.name = "c"  # invalid and new: skipped
    table.apply(broken)
    assert set(table.routes) == {"a"}
    assert addresses(table, "a") == ["h:1"]


def test_p2c_with_two_endpoints_always_picks_the_less_loaded():
    table = RouteCache(rng=random.Random(1))
    table.apply(snapshot(1, m=["h:1", "h:2"]))
    busy = table.routes["m"].endpoints[0]
    table._inflight[busy.address] = 3
    assert {power_of_two_choices(table, "m").address for _ in range(50)} == {"h:2"}


def test_p2c_never_picks_the_most_loaded_of_three_and_spreads_the_rest():
    table = RouteCache(rng=random.Random(2))
    table.apply(snapshot(1, m=["h:1", "h:2", "h:3"]))
    table._inflight.update({"h:1": 0, "h:2": 1, "h:3": 5})
    picks = [power_of_two_choices(table, "m").address for _ in range(300)]
    assert "h:3" not in picks
    assert picks.count("h:1") > picks.count("h:2") > 0  # h:2 wins only against h:3


def test_pick_excludes_endpoints_already_tried():
    table = RouteCache()
    table.apply(snapshot(1, m=["h:1", "h:2", "h:3"]))
    for _ in range(30):
        assert power_of_two_choices(table, "m", exclude={"h:1", "h:3"}).address == "h:2"
    assert power_of_two_choices(table, "m", exclude={"h:1", "h:2", "h:3"}) is None
    assert power_of_two_choices(table, "unknown") is None


async def test_leases_count_in_flight_and_release_once():
    table = RouteCache()
    table.apply(snapshot(1, m=["127.0.0.1:1"]))
    ep = table.routes["m"].endpoints[0]
    l1, l2 = table.acquire(ep), table.acquire(ep)
    assert table.inflight(ep.address) == 2 and l1.channel is l2.channel  # one cached channel per address
    l1.release()
    l1.release()
    assert table.inflight(ep.address) == 1
    l2.release()
    assert table.inflight(ep.address) == 0
    await table.close()


async def test_channel_of_a_departed_endpoint_closes_once_its_last_stream_ends():
    table = RouteCache()
    table.apply(snapshot(1, m=["127.0.0.1:1", "127.0.0.1:2"]))
    idle, busy = table.routes["m"].endpoints
    table.acquire(idle).release()
    lease = table.acquire(busy)
    table.apply(snapshot(2, m=[]))
    assert table.open_channels() == {busy.address}  # idle one closed at once, busy one kept for its stream
    lease.release()
    assert table.open_channels() == set()
    await table.close()


class FakeHead(head_pb2_grpc.RouteServiceServicer):
    """A RouteService that sends the current snapshot on Watch, then every published one."""

    def __init__(self, current: head_pb2.RoutingTable):
        self.current = current
        self.queues: list[asyncio.Queue] = []

    def publish(self, table: head_pb2.RoutingTable) -> None:
        self.current = table
        for q in self.queues:
            q.put_nowait(table)

    async def Watch(self, request, context):
        q: asyncio.Queue = asyncio.Queue()
        self.queues.append(q)
        try:
            yield self.current
            while True:
                yield await q.get()
        finally:
            self.queues.remove(q)


async def start_head(head: FakeHead, port: int = 0):
    server = grpcutil.make_server()
    head_pb2_grpc.add_RouteServiceServicer_to_server(head, server)
    port = grpcutil.bind(server, "127.0.0.1", port)
    await server.start()
    return server, port


async def test_watcher_applies_snapshots_keeps_the_last_while_the_head_is_away_and_reconnects():
    head = FakeHead(snapshot(1, m=["h:1"]))
    server, port = await start_head(head)
    table = RouteCache()
    watcher = RouteWatcher(f"127.0.0.1:{port}", table, backoff_initial_s=0.05, backoff_max_s=0.2)
    task = asyncio.create_task(watcher.run())
    try:
        await wait_for(lambda: table.version == 1 and watcher.connected)
        head.publish(snapshot(2, m=["h:1", "h:2"]))
        await wait_for(lambda: table.version == 2)

        await server.stop(None)  # the head goes away: the table stays as it was
        await wait_for(lambda: not watcher.connected)
        await asyncio.sleep(0.3)
        assert table.version == 2 and addresses(table, "m") == ["h:1", "h:2"]

        head2 = FakeHead(snapshot(1, m=["h:3"]))  # a restarted head, counting from 1 again
        server, _ = await start_head(head2, port)
        await wait_for(lambda: watcher.connected and addresses(table, "m") == ["h:3"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(None)
        await table.close()


async def test_wait_received_returns_once_the_first_snapshot_arrives_or_false_after_the_bound():
    table = RouteCache()
    assert await table.wait_received(0.05) is False
    waiter = asyncio.create_task(table.wait_received(5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    table.apply(snapshot(1, m=["h:1"]))
    assert await asyncio.wait_for(waiter, 1) is True
    assert await table.wait_received(0) is True
