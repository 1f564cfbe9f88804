"""Routing tables: versions bump only on real changes, and watchers get complete snapshots."""
import asyncio

from gridserve.common.model_config import ModelCatalog, ModelConfig
from gridserve.common.model_config_proto import config_from_proto
from gridserve.common.grpcutil import bind, channel, make_server
from gridserve.head.controller import Controller
from gridserve.head.route_table import EndpointKey, RouteKey, RouteTable
from gridserve.head.grpc_services import add_services
from gridserve.head.state import StateStore
from gridserve.v1 import head_pb2, head_pb2_grpc

E1 = EndpointKey("m-000001", "h1:1", "n1")
E2 = EndpointKey("m-000002", "h2:2", "n2")


def cfg(name: str = "m", limit: int = 16) -> ModelConfig:
    return ModelConfig.from_dict(name, {"source": {"type": "local", "path": "/x"}, "context_length": 64,
                                        "max_tokens_limit": limit, "sampling": {"max_new_tokens": 8}})


def test_version_bumps_only_when_routes_really_change():
    table = RouteTable()
    assert table.update([RouteKey("m", cfg())])
    v = table.version
    assert not table.update([RouteKey("m", cfg())])
    assert table.update([RouteKey("m", cfg(), (E1, E2))])
    assert not table.update([RouteKey("m", cfg(), (E2, E1))])  # the same endpoints in another order
    assert table.update([RouteKey("m", cfg(), (E2,))])
    assert table.update([RouteKey("m", cfg(limit=32), (E2,))])  # a config change is a change
    assert table.version == v + 3


def test_snapshot_lists_every_route_even_without_endpoints():
    table = RouteTable()
    table.update([RouteKey("b", cfg(), (E1,)), RouteKey("a", cfg("a"))])
    snap = table.snapshot()
    assert [(r.model, r.model_config.name, len(r.endpoints)) for r in snap.routes] == [("a", "a", 0), ("b", "m", 1)]
    assert config_from_proto(snap.routes[0].model_config) == cfg("a")
    assert snap.routes[1].endpoints[0] == head_pb2.Endpoint(replica_id="m-000001", address="h1:1", node_id="n1")


async def test_a_watcher_gets_the_current_table_at_once_then_each_new_version():
    table = RouteTable()
    table.update([RouteKey("m", cfg())])
    watch = table.watch()
    first = await asyncio.wait_for(anext(watch), 1)
    assert first.version == table.version
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.05)
    assert not pending.done()  # nothing new yet
    table.update([RouteKey("m", cfg(), (E1,))])
    second = await asyncio.wait_for(pending, 1)
    assert second.version == first.version + 1 and len(second.routes[0].endpoints) == 1
    await watch.aclose()


async def test_a_slow_watcher_skips_to_the_newest_complete_table():
    table = RouteTable()
    table.update([])
    watch = table.watch(deltas=False)
    await anext(watch)
    for endpoints in [(E1,), (E1, E2), (E2,)]:
        table.update([RouteKey("m", cfg(), endpoints)])
    newest = await asyncio.wait_for(anext(watch), 1)
    assert newest.version == table.version
    assert [e.replica_id for e in newest.routes[0].endpoints] == ["m-000002"]
    await watch.aclose()


async def test_after_the_first_whole_table_a_watcher_gets_deltas_against_what_it_was_sent():
    table = RouteTable()
    table.update([RouteKey("m", cfg(), (E1,)), RouteKey("gone", cfg("gone"))])
    watch = table.watch()
    first = await anext(watch)
    assert not first.delta and len(first.routes) == 2
    e1_moved = EndpointKey("m-000001", "h9:9", "n9")
    table.update([RouteKey("m", cfg(), (e1_moved, E2))])  # E1 changed address, E2 added, "gone" undeployed
    table.update([RouteKey("m", cfg(), (E2,))])            # then E1 leaves: a slow watcher gets both at once
    delta = await asyncio.wait_for(anext(watch), 1)
    assert delta.delta and (delta.base_version, delta.version) == (first.version, table.version)
    assert list(delta.removed_models) == ["gone"]
    (route,) = delta.routes
    assert [e.replica_id for e in route.endpoints] == ["m-000002"] and list(route.removed_replica_ids) == ["m-000001"]
    table.update([RouteKey("m", cfg(limit=32), (E2,))])  # a config change alone: the route, no endpoint change
    delta = await asyncio.wait_for(anext(watch), 1)
    assert [(r.model_config.max_tokens_limit, len(r.endpoints), len(r.removed_replica_ids))
            for r in delta.routes] == [(32, 0, 0)]
    await watch.aclose()


async def test_watch_over_grpc_streams_a_new_version_after_a_deploy(tmp_path):
    catalog = ModelCatalog.from_dict({"default_model": "m", "models": {"m": {
        "source": {"type": "local", "path": "/x"}, "context_length": 64, "max_tokens_limit": 32,
        "sampling": {"max_new_tokens": 16}}}})
    routes = RouteTable()
    ctl = Controller(catalog, StateStore(tmp_path), routes)
    ctl.reconcile()
    server = make_server()
    add_services(server, ctl, routes)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            call = head_pb2_grpc.RouteServiceStub(ch).Watch(head_pb2.WatchRoutesRequest())
            first = await asyncio.wait_for(call.read(), 5)
            assert first.routes == []
            await head_pb2_grpc.AdminServiceStub(ch).Deploy(head_pb2.DeployRequest(model="m", replicas=1))
            ctl.reconcile()
            second = await asyncio.wait_for(call.read(), 5)
            assert second.version > first.version
            assert [r.model for r in second.routes] == ["m"] and second.routes[0].model_config.name == "m"
            call.cancel()
    finally:
        await server.stop(0)


async def test_at_debug_the_head_logs_each_watch_send_with_its_time_since_the_change(tmp_path, caplog):
    routes = RouteTable()
    routes.update([RouteKey("m", cfg(), (E1,))])
    server = make_server()
    catalog = ModelCatalog.from_dict({"default_model": "m", "models": {"m": {
        "source": {"type": "local", "path": "/x"}, "context_length": 64,
        "max_tokens_limit": 16, "sampling": {"max_new_tokens": 8}}}})
    add_services(server, Controller(catalog, StateStore(tmp_path), routes), routes)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    caplog.set_level("DEBUG", logger="gridserve.head")
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            call = head_pb2_grpc.RouteServiceStub(ch).Watch(head_pb2.WatchRoutesRequest())
            await asyncio.wait_for(call.read(), 5)
            routes.update([RouteKey("m", cfg(), (E1, E2))])
            delta = await asyncio.wait_for(call.read(), 5)
            for _ in range(100):  # logged once the write is done, as the stream goes back to waiting
                sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("route_sent ")]
                if len(sent) == 2:
                    break
                await asyncio.sleep(0.02)
            assert "delta=False" in sent[0] and f"version={delta.version} delta=True" in sent[1]
            fields = dict(kv.split("=", 1) for kv in sent[1].split()[1:])
            assert 0 <= int(fields["after_change_ms"]) < 5000 and 0 <= int(fields["write_ms"]) < 5000
            call.cancel()
    finally:
        await server.stop(0)
