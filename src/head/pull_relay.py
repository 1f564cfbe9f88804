"""Relays `gridserve pull`: asks each chosen node's scheduler to fetch a hub model and merges their progress."""
from __future__ import annotations

import asyncio
import logging
import secrets
from typing import AsyncIterator

from gridserve.common.errors import InvalidRequest, NotFound, Unavailable
from gridserve.common.eventlog import event
from gridserve.common.model_config import ModelCatalog
from gridserve.head.node_registry import Node, Session
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.head.pulls")


def pull_source(catalog: ModelCatalog, model: str, revision: str = "") -> tuple[str, str]:
    """(hub repo, revision) for a catalog model with a hub source, or for a hub repo id given as is."""
    config = catalog.get(model)
    if config is not None:
        if config.source.type != "hub":
            raise InvalidRequest(f"model {model!r} loads from {config.source.type} "
                                 f"({config.source.describe()}), not from a hub: there is nothing to pull")
        return config.source.repo, revision or config.source.revision
    if model.count("/") == 1 and all(part.strip() for part in model.split("/")):
        return model, revision
    raise NotFound(f"model {model!r} is not in the catalog and is not a hub repo id (org/name); "
                   f"known models: {', '.join(sorted(catalog.models))}")


def pull_sessions(nodes: dict[str, Node], node_id: str = "") -> list[Session]:
    """The sessions of the nodes a pull goes to: `node_id`, or every alive node."""
    if node_id:
        node = nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id!r} is not known to the head (nodes: {', '.join(sorted(nodes)) or 'none'})")
        if not node.alive or node.session is None:
            raise Unavailable(f"node {node_id} is not connected")
        return [node.session]
    sessions = [n.session for _, n in sorted(nodes.items()) if n.alive and n.session is not None]
    if not sessions:
        raise Unavailable("no alive node to pull to")
    return sessions


class PullRelay:
    """Open pulls by stream id; progress from nodes goes to the caller's queue, a node leaving ends its part."""

    def __init__(self) -> None:
        self._queues: dict[str, tuple[str, asyncio.Queue]] = {}  # stream id -> (node id, caller's queue)

    async def pull(self, sessions: list[Session], repo: str, revision: str) -> AsyncIterator[head_pb2.PullProgress]:
        """Every node's progress, as it comes, until each node has ended (done, error, or gone)."""
        queue: asyncio.Queue = asyncio.Queue()
        open_ids: dict[str, Session] = {}
        for session in sessions:
            sid = secrets.token_hex(8)
            open_ids[sid] = session
            self._queues[sid] = (session.node_id, queue)
            session.send(head_pb2.HeadMessage(model_pull=head_pb2.ModelPullRequest(
                stream_id=sid, repo=repo, revision=revision)))
        event(log, "pull_opened", repo=repo, revision=revision or "main", nodes=",".join(s.node_id for s in sessions))
        try:
            while open_ids:
                item: head_pb2.PullProgress = await queue.get()
                if item.done or item.error:
                    open_ids.pop(item.stream_id, None)
                    self._queues.pop(item.stream_id, None)
                out = head_pb2.PullProgress()
                out.CopyFrom(item)
                out.stream_id = ""
                yield out
        finally:
            for sid, session in open_ids.items():
                self._queues.pop(sid, None)
                if not session.closed:
                    session.send(head_pb2.HeadMessage(model_pull_cancel=head_pb2.ModelPullCancel(stream_id=sid)))
            event(log, "pull_closed", repo=repo, unfinished=len(open_ids))

    def deliver(self, node_id: str, progress: head_pb2.PullProgress) -> None:
        """Progress from a node; ignored when its pull is gone (a late message after a cancel)."""
        entry = self._queues.get(progress.stream_id)
        if entry is not None and entry[0] == node_id:
            entry[1].put_nowait(progress)

    def node_gone(self, node_id: str, reason: str) -> None:
        """Ends the part of every open pull that a node whose session closed was doing."""
        for sid, (nid, queue) in list(self._queues.items()):
            if nid == node_id:
                queue.put_nowait(head_pb2.PullProgress(stream_id=sid, node_id=node_id,
                                                       error=f"node {node_id} went away: {reason}"))
