"""Sends replica log files to the head over the node session, once or following appends, one task per stream."""
from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Awaitable, Callable

from gridserve.common.eventlog import event
from gridserve.common.paths import WorkDir
from gridserve.common.service import cancel_and_wait
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.scheduler.log_streams")

CHUNK_BYTES = 32 * 1024
FOLLOW_POLL_S = 0.25
OUTBOX_LIMIT = 64  # chunks waiting for the session; a full outbox makes readers wait
REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

Send = Callable[[head_pb2.LogChunk], Awaitable[None]]


def log_path(work_dir: Path, replica_id: str) -> Path | None:
    """<work-dir>/logs/<replica_id>.log, or None for an id that is not a plain name (no path tricks)."""
    if not REPLICA_ID.fullmatch(replica_id):
        return None
    return WorkDir(work_dir).replica_log(replica_id)


def tail_offset(f, lines: int) -> int:
    """Where the last `lines` lines of the open binary file `f` begin (0 for the whole file)."""
    end = f.seek(0, 2)
    if lines < 0:
        return 0
    if lines == 0:
        return end
    pos, newlines = end, 0
    while pos > 0:
        step = min(CHUNK_BYTES, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        if pos + step == end and block.endswith(b"\n"):
            block = block[:-1]  # the final newline ends the last line, it does not start a new one
        for i in range(len(block) - 1, -1, -1):
            if block[i] == 0x0A:
                newlines += 1
                if newlines == lines:
                    return pos + i + 1
    return 0


async def send_log(path: Path, tail_lines: int, follow: bool, send: Send, stream_id: str) -> None:
    """Sends the file (its last `tail_lines` lines) in chunks; then eof, or, following, what is appended."""
    try:
        f = open(path, "rb")
    except OSError as e:
        await send(head_pb2.LogChunk(stream_id=stream_id, error=f"no log for this replica here ({path}: "
                                                                   f"{e.strerror})"))
        return
    with f:
        f.seek(tail_offset(f, tail_lines))
        while True:
            data = f.read(CHUNK_BYTES)
            if data:
                await send(head_pb2.LogChunk(stream_id=stream_id, data=data))
                continue
            if not follow:
                await send(head_pb2.LogChunk(stream_id=stream_id, eof=True))
                return
            await asyncio.sleep(FOLLOW_POLL_S)
            if path.stat().st_size < f.tell():  # truncated: start over
                f.seek(0)


class LogStreams:
    """The log streams the head opened over one session: a task each, their chunks in one bounded outbox."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.outbox: asyncio.Queue[head_pb2.NodeMessage] = asyncio.Queue(maxsize=OUTBOX_LIMIT)
        self.tasks: dict[str, asyncio.Task] = {}

    async def _send(self, chunk: head_pb2.LogChunk) -> None:
        await self.outbox.put(head_pb2.NodeMessage(log_chunk=chunk))

    def open(self, req: head_pb2.LogRequest) -> None:
        event(log, "log_stream_open", stream=req.stream_id, replica=req.replica_id, follow=req.follow,
              tail=req.tail_lines)
        self.tasks[req.stream_id] = asyncio.create_task(self._run(req), name=f"log-{req.stream_id}")

    async def _run(self, req: head_pb2.LogRequest) -> None:
        path = log_path(self.work_dir, req.replica_id)
        try:
            if path is None:
                await self._send(head_pb2.LogChunk(stream_id=req.stream_id,
                                                   error=f"{req.replica_id!r} is not a replica id"))
                return
            await send_log(path, req.tail_lines, req.follow, self._send, req.stream_id)
        except OSError as e:
            await self._send(head_pb2.LogChunk(stream_id=req.stream_id, error=f"reading {path}: {e}"))
        finally:
            self.tasks.pop(req.stream_id, None)

    def cancel(self, stream_id: str) -> None:
        task = self.tasks.pop(stream_id, None)
        if task is not None:
            task.cancel()
            event(log, "log_stream_cancelled", stream=stream_id)

    async def close(self) -> None:
        tasks, self.tasks = list(self.tasks.values()), {}
        await cancel_and_wait(*tasks)
