"""The proxy's load report: requests per model split into ongoing (a replica stream open) and queued."""
from gridserve.proxy.load_report import LoadTracker, build_report
from gridserve.proxy.route_cache import RouteCache
from gridserve.v1 import head_pb2
from support.fakes import model_config


def table_with(*endpoints: tuple[str, str]) -> RouteCache:
    table = RouteCache()
    snapshot = head_pb2.RoutingTable(version=1)
    route = snapshot.routes.add(model="tiny", model_config=model_config("tiny"))
    for rid, address in endpoints:
        route.endpoints.add(replica_id=rid, address=address)
    table.apply(snapshot)
    return table


def test_ongoing_is_streams_per_replica_and_the_rest_of_the_requests_are_queued():
    table, tracker = table_with(("tiny-a", "10.0.0.1:1"), ("tiny-b", "10.0.0.2:1")), LoadTracker()
    table._inflight.update({"10.0.0.1:1": 2, "10.0.0.2:1": 1})
    for _ in range(5):
        tracker.begin("tiny")
    tracker.begin("gone")
    report = build_report("p1", table, tracker)
    assert report.proxy_id == "p1"
    gone, tiny = report.models  # sorted by model name
    assert (tiny.model, tiny.ongoing, tiny.queued) == ("tiny", 3, 2)
    assert [(r.replica_id, r.ongoing) for r in tiny.replicas] == [("tiny-a", 2), ("tiny-b", 1)]
    assert (gone.model, gone.ongoing, gone.queued, len(gone.replicas)) == ("gone", 0, 1, 0)


def test_an_idle_model_reports_zero_and_ended_requests_leave_no_trace():
    table, tracker = table_with(), LoadTracker()
    tracker.begin("tiny")
    tracker.end("tiny")
    assert tracker.requests == {}
    (tiny,) = build_report("p1", table, tracker).models
    assert (tiny.ongoing, tiny.queued) == (0, 0)
