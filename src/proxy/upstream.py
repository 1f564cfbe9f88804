"""Opens a Generate stream on a replica, retrying another one (tenacity) until the first chunk arrives."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import grpc
from tenacity import (AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay,
                      wait_exponential_jitter)

from gridserve.common.logs import event
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.routes import Endpoint, Lease, RouteTable
from gridserve.v1 import replica_pb2, replica_pb2_grpc

log = logging.getLogger("gridserve.proxy.upstream")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to look for a replica before the first token: attempts, overall deadline, backoff."""
    attempts: int = 3
    deadline_s: float = 10.0
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0


class UpstreamStream:
    """An open Generate call whose first chunk has arrived (`first` is None if the stream was empty)."""

    def __init__(self, lease: Lease, call, first: replica_pb2.GenerateResponse | None):
        self.lease, self.call, self.first = lease, call, first
        self.first_at = time.monotonic()

    @property
    def endpoint(self) -> Endpoint:
        return self.lease.endpoint

    async def chunks(self) -> AsyncIterator[replica_pb2.GenerateResponse]:
        """Every chunk, the first included; raises grpc.aio.AioRpcError if the replica fails."""
        if self.first is None:
            return
        yield self.first
        while True:
            chunk = await self.call.read()
            if chunk is grpc.aio.EOF:
                return
            yield chunk

    def close(self) -> None:
        """Cancels the call if it is still running and stops counting it as in flight."""
        self.call.cancel()
        self.lease.release()


def _retryable(e: BaseException) -> bool:
    return isinstance(e, HttpError) and e.retryable


async def open_stream(table: RouteTable, model: str, request: replica_pb2.GenerateRequest,
                      policy: RetryPolicy = RetryPolicy(), on_retry: Callable[[], None] = lambda: None
                      ) -> UpstreamStream:
    """Picks a replica and waits for its first chunk; on UNAVAILABLE/RESOURCE_EXHAUSTED before it,
    backs off and tries another replica (calling `on_retry` for each such try).
    Raises HttpError (no replica, all failed, bad request)."""
    tried: set[str] = set()
    last: list[HttpError] = []
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.deadline_s),
        wait=wait_exponential_jitter(initial=policy.backoff_initial_s, max=policy.backoff_max_s,
                                    jitter=policy.backoff_initial_s),
        retry=retry_if_exception(_retryable), reraise=True)
    async for attempt in retrying:
        with attempt:
            endpoint = table.pick(model, exclude=tried)
            if endpoint is None:
                raise _no_endpoint(model, last)
            if attempt.retry_state.attempt_number > 1:
                on_retry()
            tried.add(endpoint.address)
            try:
                return await _open_on(table, endpoint, request)
            except HttpError as e:
                last.append(e)
                event(log, "upstream_attempt_failed", request_id=request.request_id, model=model,
                      replica=endpoint.replica_id, attempt=attempt.retry_state.attempt_number,
                      status=e.status, retry=e.retryable, error=e.message)
                raise
    raise AssertionError("unreachable: tenacity reraises the last error")


def _no_endpoint(model: str, last: list[HttpError]) -> HttpError:
    if last:  # every endpoint was tried: the client sees what the last one said, not retried further
        e = last[-1]
        return HttpError(e.status, e.error_type, e.message, retryable=False)
    return HttpError(503, "service_unavailable", f"no ready replica for model {model!r}; try again shortly")


async def _open_on(table: RouteTable, endpoint: Endpoint,
                   request: replica_pb2.GenerateRequest) -> UpstreamStream:
    lease = table.acquire(endpoint)
    call = replica_pb2_grpc.ReplicaStub(lease.channel).Generate(request)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as e:
        call.cancel()
        lease.release()
        raise HttpError.from_grpc(e, where=f"replica {endpoint.replica_id}") from None
    except BaseException:
        call.cancel()
        lease.release()
        raise
    return UpstreamStream(lease, call, None if first is grpc.aio.EOF else first)
