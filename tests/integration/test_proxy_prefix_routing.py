"""Cache-aware routing on the real proxy: the turns of a conversation go to the replica that served its start;
with `--routing p2c` they spread over the replicas (the power of two choices alone)."""
import pytest

from support.fakes import Proxy, head, http, proxy, publish, replicas  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)

SYSTEM = "You answer questions about the history of computing, briefly and precisely. " * 5


async def ask(http, proxy, messages) -> str:
    body = {"model": "tiny", "messages": [{"role": "system", "content": SYSTEM}, *messages]}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Replica-Id"]


async def conversation_replicas(http, proxy, conversation: int) -> set[str]:
    messages = [{"role": "user", "content": f"conversation {conversation}: who built the ENIAC?"}]
    served = set()
    for turn in range(4):
        served.add(await ask(http, proxy, messages))
        messages += [{"role": "assistant", "content": "Hello, world!"},
                     {"role": "user", "content": f"and then, turn {turn}?"}]
    return served


async def test_every_turn_of_a_conversation_is_served_by_the_same_replica(head, proxy, http, replicas):  # noqa: F811
    reps = [await replicas(f"tiny-a0000{i}") for i in range(3)]
    await publish(http, proxy, head, tiny=reps)
    for conversation in range(3):
        assert len(await conversation_replicas(http, proxy, conversation)) == 1


async def test_with_p2c_routing_the_turns_of_a_conversation_spread_over_the_replicas(head, http, replicas,  # noqa: F811
                                                                                     tmp_path):
    reps = [await replicas(f"tiny-b0000{i}") for i in range(3)]
    p2c = await Proxy(head.port, tmp_path, extra=("--routing", "p2c")).start()
    try:
        await publish(http, p2c, head, tiny=reps)
        # nothing in flight: each turn picks a uniformly random replica, so 6 conversations all staying
        # on one replica each would have a chance of (1/27)^6
        spread = [len(await conversation_replicas(http, p2c, c)) for c in range(6)]
        assert max(spread) > 1
    finally:
        await p2c.stop()
    assert "routing=p2c" in p2c.log_path.read_text()
