"""Cache-aware routing on the real proxy: the turns of a conversation go to the replica that served its start."""
import pytest

from support.fakes import head, http, proxy, publish, replicas  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(60)

SYSTEM = "You answer questions about the history of computing, briefly and precisely. " * 5


async def ask(http, proxy, messages) -> str:
    body = {"model": "tiny", "messages": [{"role": "system", "content": SYSTEM}, *messages]}
    async with http.post(f"{proxy.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Replica-Id"]


async def test_every_turn_of_a_conversation_is_served_by_the_same_replica(head, proxy, http, replicas):  # noqa: F811
    reps = [await replicas(f"tiny-a0000{i}") for i in range(3)]
    await publish(http, proxy, head, tiny=reps)
    for conversation in range(3):
        messages = [{"role": "user", "content": f"conversation {conversation}: who built the ENIAC?"}]
        served = set()
        for turn in range(4):
            served.add(await ask(http, proxy, messages))
            messages += [{"role": "assistant", "content": "Hello, world!"},
                         {"role": "user", "content": f"and then, turn {turn}?"}]
        assert len(served) == 1
