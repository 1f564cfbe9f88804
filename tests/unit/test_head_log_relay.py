"""The head's log relay: a Logs stream asks the node, yields its chunks, cancels on the node when the reader
leaves, and ends with an error when the node goes away or the reader falls behind."""
import asyncio

import pytest

from gridserve.common.errors import NotFound, Unavailable
from gridserve.head import log_relay as logrelay
from gridserve.head.log_relay import LogRelay
from gridserve.head.node_registry import Session
from gridserve.v1 import head_pb2 as pb


def started(relay: LogRelay, session: Session, follow: bool = False):
    """A stream's async iterator and the LogRequest the node received for it."""
    stream = relay.stream(session, "m-abcdef", follow, -1)
    first = asyncio.ensure_future(anext(stream))
    return stream, first


async def request_sent(session: Session) -> pb.LogRequest:
    reader = asyncio.ensure_future(asyncio.sleep(3600))
    try:
        msg = await asyncio.wait_for(session.next(reader), 1)
    finally:
        reader.cancel()
    assert msg.WhichOneof("kind") == "log_request"
    return msg.log_request


async def test_chunks_arrive_in_order_and_eof_ends_the_stream():
    relay, session = LogRelay(), Session("n1")
    stream, first = started(relay, session)
    req = await request_sent(session)
    assert (req.replica_id, req.follow, req.tail_lines) == ("m-abcdef", False, -1)
    relay.deliver("n1", pb.LogChunk(stream_id=req.stream_id, data=b"one\n"))
    relay.deliver("n2", pb.LogChunk(stream_id=req.stream_id, data=b"not from this node\n"))
    relay.deliver("n1", pb.LogChunk(stream_id=req.stream_id, data=b"two\n", eof=True))
    assert await first == b"one\n"
    assert [d async for d in stream] == [b"two\n"]
    assert not session._control  # finished: nothing to cancel on the node


async def test_a_node_error_is_not_found_with_the_nodes_message():
    relay, session = LogRelay(), Session("n1")
    stream, first = started(relay, session)
    req = await request_sent(session)
    relay.deliver("n1", pb.LogChunk(stream_id=req.stream_id, error="no log for this replica here"))
    with pytest.raises(NotFound, match="node n1: no log for this replica here"):
        await first


async def test_a_reader_that_leaves_cancels_the_stream_on_the_node():
    relay, session = LogRelay(), Session("n1")
    stream, first = started(relay, session, follow=True)
    req = await request_sent(session)
    relay.deliver("n1", pb.LogChunk(stream_id=req.stream_id, data=b"x"))
    assert await first == b"x"
    await stream.aclose()
    reader = asyncio.ensure_future(asyncio.sleep(3600))
    cancel = await session.next(reader)
    reader.cancel()
    assert cancel.log_cancel.stream_id == req.stream_id
    relay.deliver("n1", pb.LogChunk(stream_id=req.stream_id, data=b"late"))  # ignored, no error


async def test_a_node_going_away_or_a_slow_reader_ends_the_stream_with_unavailable(monkeypatch):
    relay, session = LogRelay(), Session("n1")
    _, first = started(relay, session, follow=True)
    await request_sent(session)
    relay.node_gone("n1", "session ended")
    with pytest.raises(Unavailable, match="node n1 went away: session ended"):
        await first
    monkeypatch.setattr(logrelay, "MAX_BUFFERED", 2)
    stream, pending = started(relay, session, follow=True)
    req = await request_sent(session)
    for i in range(5):  # all at once: the reader has not had a turn
        relay.deliver("n1", pb.LogChunk(stream_id=req.stream_id, data=b"%d" % i))
    got = [await pending]
    with pytest.raises(Unavailable, match="too slow"):
        async for d in stream:
            got.append(d)
    assert got == [b"0", b"1"]
