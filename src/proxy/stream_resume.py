"""Mid-stream failover: one request's replica streams read as one, moving to another replica (which resumes
from the tokens already received) when the one in use goes away."""
from __future__ import annotations

import logging
from typing import AsyncIterator, Callable

import grpc

from gridserve.common.eventlog import event
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.route_cache import RouteCache
from gridserve.proxy.retry import RetryPolicy, UpstreamStream, open_stream
from gridserve.v1 import replica_pb2

log = logging.getLogger("gridserve.proxy")

ABORT = replica_pb2.FINISH_REASON_ABORT


class Upstreams:
    """The replica streams of one request: the first from open(), then one per failover. chunks() yields
    what they carry as one stream (nothing twice); close() ends every stream opened."""

    def __init__(self, table: RouteCache, model: str, request: replica_pb2.GenerateRequest,
                 policy: RetryPolicy, on_retry: Callable[[], None] = lambda: None,
                 on_failover: Callable[[str], None] = lambda outcome: None):
        self.table, self.model, self.request, self.policy = table, model, request, policy
        self.on_retry, self.on_failover = on_retry, on_failover
        self.tried: set[str] = set()       # addresses tried for this request: a failover skips them
        self.token_ids: list[int] = []     # every token id received, in order: the resume point
        self.streams: list[UpstreamStream] = []
        self.failovers = 0                 # streams resumed on another replica

    @property
    def replica_id(self) -> str:
        """The replica of the stream in use (the last one opened)."""
        return self.streams[-1].endpoint.replica_id if self.streams else ""

    async def open(self) -> UpstreamStream:
        """The first stream (retrying before its first chunk); raises HttpError as open_stream does."""
        stream = await open_stream(self.table, self.model, self.request, self.policy, self.on_retry, self.tried)
        self.streams.append(stream)
        return stream

    async def chunks(self) -> AsyncIterator[replica_pb2.GenerateResponse]:
        """Every chunk of the stream in use; when its replica goes away (or aborts), the chunks of the
        stream that resumes it. Raises HttpError when a replica fails for the request's own reasons or
        no replica can continue. An ABORT chunk comes out without its finish reason and usage."""
        while True:
            stream = self.streams[-1]
            where = f"replica {stream.endpoint.replica_id}"
            try:
                async for chunk in stream.chunks():
                    self.token_ids.extend(chunk.token_ids)
                    if chunk.finish_reason != ABORT:
                        yield chunk
                        continue
                    yield replica_pb2.GenerateResponse(text=chunk.text, token_ids=chunk.token_ids)
                    lost, reason = HttpError(503, "service_unavailable", f"{where} aborted the generation"), "ABORT"
                    break
                else:
                    return
            except grpc.aio.AioRpcError as e:
                lost = HttpError.from_grpc(e, where=f"{where} failed mid-stream")
                if not stream.lost(e):
                    raise lost from None
                reason = f"{e.code().name}: {e.details()}"
            await self._fail_over(stream, lost, reason)

    async def _fail_over(self, old: UpstreamStream, lost: HttpError, reason: str) -> None:
        """Opens a stream that resumes the request after self.token_ids on a replica not tried yet;
        raises `lost` (with why nothing could continue) if none can."""
        old.close()
        fields = dict(request_id=self.request.request_id, model=self.model, from_replica=old.endpoint.replica_id)
        sent = dict(tokens_sent=len(self.token_ids), reason=reason)
        if self.failovers >= self.policy.max_failovers:
            raise self._failed(lost, f"failover limit of {self.policy.max_failovers} reached", fields, sent)
        resume = replica_pb2.GenerateRequest()
        resume.CopyFrom(self.request)
        resume.resume_token_ids.extend(self.token_ids)
        try:
            stream = await open_stream(self.table, self.model, resume, self.policy, self.on_retry, self.tried)
        except HttpError as e:
            raise self._failed(lost, e.message, fields, sent) from None
        self.streams.append(stream)
        self.failovers += 1
        self.on_failover("resumed")
        event(log, "failover", **fields, to_replica=stream.endpoint.replica_id, **sent, outcome="resumed")

    def _failed(self, lost: HttpError, why: str, fields: dict, sent: dict) -> HttpError:
        self.on_failover("failed")
        event(log, "failover", logging.WARNING, **fields, to_replica="", **sent, outcome="failed", error=why)
        return HttpError(lost.status, lost.error_type, f"{lost.message}; no replica could continue: {why}")

    def close(self) -> None:
        """Cancels every stream still running and releases its replica (idempotent)."""
        for stream in self.streams:
            stream.close()
