"""The head's pull relay: a pull goes to the chosen nodes' sessions, their progress comes back interleaved until
each node ends, a node that goes away ends its part, a caller that leaves cancels on the nodes."""
import asyncio

import pytest

from gridserve.common.errors import InvalidRequest, NotFound, Unavailable
from gridserve.common.model_config import ModelCatalog
from gridserve.head.node_registry import Node, Session
from gridserve.head.pull_relay import PullRelay, pull_sessions, pull_source
from gridserve.v1 import head_pb2 as pb

BASE = {"context_length": 64, "max_tokens_limit": 32, "sampling": {"max_new_tokens": 16}}
CATALOG = ModelCatalog.from_dict({"default_model": "local", "models": {
    "local": {**BASE, "source": {"type": "local", "path": "/x"}},
    "gpt2": {**BASE, "source": {"type": "hub", "repo": "openai-community/gpt2", "revision": "v1"}}}})


def test_a_pull_names_a_catalog_hub_model_or_a_repo_id():
    assert pull_source(CATALOG, "gpt2") == ("openai-community/gpt2", "v1")
    assert pull_source(CATALOG, "gpt2", "main") == ("openai-community/gpt2", "main")
    assert pull_source(CATALOG, "org/name") == ("org/name", "")
    with pytest.raises(InvalidRequest, match="loads from local .* nothing to pull"):
        pull_source(CATALOG, "local")
    with pytest.raises(NotFound, match="not in the catalog and is not a hub repo id"):
        pull_source(CATALOG, "nope")


def node(node_id: str, alive: bool = True) -> Node:
    return Node(node_id, alive=alive, session=Session(node_id) if alive else None)


def test_a_pull_goes_to_every_alive_node_or_the_one_named():
    nodes = {"a": node("a"), "b": node("b"), "c": node("c", alive=False)}
    assert [s.node_id for s in pull_sessions(nodes)] == ["a", "b"]
    assert [s.node_id for s in pull_sessions(nodes, "b")] == ["b"]
    with pytest.raises(Unavailable, match="node c is not connected"):
        pull_sessions(nodes, "c")
    with pytest.raises(NotFound, match="node 'z' is not known"):
        pull_sessions(nodes, "z")
    with pytest.raises(Unavailable, match="no alive node"):
        pull_sessions({})


async def sent(session: Session) -> pb.HeadMessage:
    reader = asyncio.ensure_future(asyncio.sleep(3600))
    try:
        return await asyncio.wait_for(session.next(reader), 1)
    finally:
        reader.cancel()


async def test_progress_of_every_node_comes_back_until_each_ends():
    relay, a, b = PullRelay(), Session("a"), Session("b")
    stream = relay.pull([a, b], "org/m", "")
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    ra, rb = (await sent(a)).model_pull, (await sent(b)).model_pull
    assert (ra.repo, rb.repo) == ("org/m", "org/m") and ra.stream_id != rb.stream_id
    relay.deliver("a", pb.PullProgress(stream_id=ra.stream_id, node_id="a", done_bytes=5, total_bytes=10))
    assert (await first).done_bytes == 5 and (await first).stream_id == ""
    relay.deliver("b", pb.PullProgress(stream_id=ra.stream_id, node_id="b", done=True))  # not b's stream: ignored
    relay.deliver("a", pb.PullProgress(stream_id=ra.stream_id, node_id="a", done=True))
    relay.node_gone("b", "session closed")
    got = [p async for p in stream]
    assert [(p.node_id, p.done, p.error) for p in got] == [("a", True, ""), ("b", False, "node b went away: "
                                                                                        "session closed")]


async def test_a_caller_that_leaves_cancels_the_pull_on_the_nodes():
    relay, a = PullRelay(), Session("a")
    stream = relay.pull([a], "org/m", "")
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    request = (await sent(a)).model_pull
    first.cancel()  # gRPC cancels the handler's task the same way
    await asyncio.gather(first, return_exceptions=True)
    assert (await sent(a)).model_pull_cancel.stream_id == request.stream_id
    relay.deliver("a", pb.PullProgress(stream_id=request.stream_id, node_id="a", done=True))  # late: dropped
