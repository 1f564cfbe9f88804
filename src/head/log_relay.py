"""Relays a replica's log from its node's scheduler to an AdminService.Logs caller, over the node session."""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import AsyncIterator

from gridserve.common.errors import NotFound, Unavailable
from gridserve.common.eventlog import event
from gridserve.head.node_registry import Session
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.head.logs")

MAX_BUFFERED = 256  # chunks held for a slow reader before its stream is ended


@dataclass
class _Stream:
    node_id: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    ended: bool = False  # an error was queued: later chunks are dropped


class LogRelay:
    """Open log streams by id. A stream asks the node for the log and yields the chunks the node sends;
    a reader that goes away cancels it on the node; a node that goes away ends it with an error."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}

    async def stream(self, session: Session, replica_id: str, follow: bool, tail_lines: int) -> AsyncIterator[bytes]:
        sid = secrets.token_hex(8)
        st = self._streams[sid] = _Stream(session.node_id)
        session.send(head_pb2.HeadMessage(log_request=head_pb2.LogRequest(
            stream_id=sid, replica_id=replica_id, tail_lines=tail_lines, follow=follow)))
        event(log, "log_stream_opened", stream=sid, replica=replica_id, node=session.node_id, follow=follow)
        finished = False
        try:
            while True:
                item = await st.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if item.data:
                    yield item.data
                if item.error:
                    finished = True
                    raise NotFound(f"node {session.node_id}: {item.error}")
                if item.eof:
                    finished = True
                    return
        finally:
            self._streams.pop(sid, None)
            if not finished and not session.closed:
                session.send(head_pb2.HeadMessage(log_cancel=head_pb2.LogCancel(stream_id=sid)))
            event(log, "log_stream_closed", stream=sid, finished=finished)

    def deliver(self, node_id: str, chunk: head_pb2.LogChunk) -> None:
        """A chunk from a node; ignored if its stream is gone (a late chunk after a cancel)."""
        st = self._streams.get(chunk.stream_id)
        if st is None or st.node_id != node_id or st.ended:
            return
        if st.queue.qsize() >= MAX_BUFFERED:
            self._end(st, Unavailable("the log reader is too slow; stream ended"))
            return
        st.queue.put_nowait(chunk)

    def node_gone(self, node_id: str, reason: str) -> None:
        """Ends every stream of a node whose session closed."""
        for st in self._streams.values():
            if st.node_id == node_id:
                self._end(st, Unavailable(f"node {node_id} went away: {reason}"))

    @staticmethod
    def _end(st: _Stream, error: Exception) -> None:
        if not st.ended:
            st.ended = True
            st.queue.put_nowait(error)
