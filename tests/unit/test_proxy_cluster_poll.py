"""The proxy's cluster poller at scale: Info calls per poll are capped and the cap walks through the replicas."""
from gridserve.proxy.cluster_metrics import MAX_INFOS_PER_POLL, ClusterCollector, ClusterPoller
from gridserve.proxy.route_cache import RouteCache


def test_beyond_the_cap_each_poll_asks_the_next_replicas_in_turn_and_all_of_few():
    poller = ClusterPoller("127.0.0.1:1", RouteCache(), ClusterCollector(), 5.0)
    many = list(range(2 * MAX_INFOS_PER_POLL + 88))
    first, second, third = (poller._next_batch(many) for _ in range(3))
    assert first == many[:MAX_INFOS_PER_POLL] and second == many[MAX_INFOS_PER_POLL:2 * MAX_INFOS_PER_POLL]
    assert third == many[2 * MAX_INFOS_PER_POLL:] + many[:MAX_INFOS_PER_POLL - 88]  # wraps around
    few = list(range(10))
    assert poller._next_batch(few) == few
