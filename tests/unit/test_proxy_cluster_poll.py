"""The proxy's cluster poller: Info calls per poll are capped and the cap walks through the replicas; one poller
feeds /metrics every --metrics-interval and the dashboard every second while it watches."""
import asyncio

from gridserve.proxy.cluster_metrics import MAX_INFOS_PER_POLL, ClusterCollector, ClusterPoller
from gridserve.proxy.route_cache import RouteCache
from support.fakes import FakeHead
from support.waiting import wait_until


def test_beyond_the_cap_each_poll_asks_the_next_replicas_in_turn_and_all_of_few():
    poller = ClusterPoller("127.0.0.1:1", RouteCache(), ClusterCollector(), 5.0)
    many = list(range(2 * MAX_INFOS_PER_POLL + 88))
    first, second, third = (poller._next_batch(many) for _ in range(3))
    assert first == many[:MAX_INFOS_PER_POLL] and second == many[MAX_INFOS_PER_POLL:2 * MAX_INFOS_PER_POLL]
    assert third == many[2 * MAX_INFOS_PER_POLL:] + many[:MAX_INFOS_PER_POLL - 88]  # wraps around
    few = list(range(10))
    assert poller._next_batch(few) == few


class CountingHead(FakeHead):
    """A fake head that counts the Status calls (one per poll)."""
    calls = 0

    async def Status(self, request, context):
        self.calls += 1
        return await super().Status(request, context)


async def test_one_poller_waits_its_interval_until_watched_then_polls_every_fast_interval():
    head = await CountingHead().start()
    poller = ClusterPoller(f"127.0.0.1:{head.port}", RouteCache(), ClusterCollector(), 300.0, fast_interval=0.1)
    task = asyncio.create_task(poller.run())
    try:
        await wait_until(lambda: head.calls == 1 and poller.collector.head_up, 10, "the first poll")
        await poller.fresh(60.0)  # recent enough: no wait, but watched from now on: a poll at once, then fast
        await wait_until(lambda: head.calls >= 4, 2, "polls every fast interval")
        poller._watched_until = 0.0  # nobody watches any more: the next poll after that is 300 s away
        await asyncio.wait_for(poller._next.wait(), 5)  # the poll under way (or next) ends, then none comes
        settled = head.calls
        await asyncio.sleep(0.5)
        assert head.calls == settled
        before = poller.collector.polled_at
        await poller.fresh(0.0)  # too old for the caller: it waits for a new poll, made at once
        assert head.calls == settled + 1 and poller.collector.polled_at > before
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await head.server.stop(None)
