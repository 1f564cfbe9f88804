"""The node registry's records: one Node per scheduler, and the Session that carries its desired state."""
from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass, field

from gridserve.v1 import head_pb2

_session_ids = itertools.count(1)


class Session:
    """One open NodeService.Session stream: the newest DesiredState waiting to be sent, log requests to
    send in order, and a close flag. Desired states are level-triggered, so an unsent older one is simply
    replaced by a newer one; log requests and cancels are each sent once."""

    def __init__(self, node_id: str, peer: str = ""):
        self.id = next(_session_ids)
        self.node_id = node_id
        self.peer = peer
        self.closed = False
        self.close_reason = ""
        self.reports = 0
        self._pending: head_pb2.DesiredState | None = None
        self._control: collections.deque[head_pb2.HeadMessage] = collections.deque()
        self._wake = asyncio.Event()

    def push(self, desired: head_pb2.DesiredState) -> None:
        self._pending = desired
        self._wake.set()

    def send(self, message: head_pb2.HeadMessage) -> None:
        """Queues a log request or cancel; sent after any pending desired state."""
        self._control.append(message)
        self._wake.set()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed, self.close_reason = True, reason
        self._wake.set()

    def take(self) -> head_pb2.DesiredState | None:
        """The DesiredState waiting to be sent, if any (and forgets it)."""
        msg, self._pending = self._pending, None
        return msg

    async def next(self, reader: asyncio.Task) -> head_pb2.HeadMessage | None:
        """The next message to send; None once the session is closed or its reader has ended."""
        while True:
            if self.closed:
                return None
            if self._pending is not None:
                return head_pb2.HeadMessage(desired=self.take())
            if self._control:
                return self._control.popleft()
            if reader.done():
                return None
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
            self._wake.clear()


@dataclass
class Node:
    """What the head knows about one scheduler's machine."""
    node_id: str
    hostname: str = ""
    address: str = ""
    capacity: head_pb2.Resources = field(default_factory=head_pb2.Resources)
    available: head_pb2.Resources = field(default_factory=head_pb2.Resources)
    cpu_percent: float = 0.0
    alive: bool = False
    synced: bool = False          # its first report after the hello has been seen
    awaiting: bool = False        # known from stored placements, waiting to reconnect after a head restart
    last_seen: float = 0.0        # monotonic
    last_seen_wall: float = 0.0   # unix time, for status
    session: Session | None = None
    sent_key: tuple | None = None  # the replica set last sent, to send only real changes
    reports: dict[str, head_pb2.ReplicaStatus] = field(default_factory=dict)
    cached_models: list[head_pb2.CachedModel] = field(default_factory=list)  # its HF cache, as last reported
