"""Opens a Generate stream on a replica, retrying another one (tenacity) until the first chunk arrives,
and tells a replica that went away mid-stream from a request that failed on its own."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from tenacity import (AsyncRetrying, retry_if_exception, stop_after_attempt, stop_after_delay,
                      wait_exponential, wait_random)

from gridserve.common.eventlog import event
from gridserve.proxy.replica_picker import affinity_of, power_of_two_choices
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.route_cache import Endpoint, Lease, RouteCache
from gridserve.v1 import replica_pb2, replica_pb2_grpc

log = logging.getLogger("gridserve.proxy.retry")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to look for a replica before the first token (attempts, overall deadline, backoff, how long
    one replica may take to admit the call) and how often a stream may move after it (failovers)."""
    attempts: int = 3
    deadline_s: float = 10.0
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0
    accept_timeout_s: float = 5.0  # per attempt: until the replica's initial metadata (it admitted the call)
    max_failovers: int = 3         # per request: mid-stream moves to another replica


# Words in INTERNAL/UNKNOWN details that mean the connection broke, not that the request was at fault.
TRANSPORT_HINTS = ("rst_stream", "socket closed", "connection reset", "broken pipe", "goaway",
                   "stream removed", "connection closed", "transport closed")


def replica_lost(e: grpc.aio.AioRpcError) -> bool:
    """True when a failed call means the replica (or the link to it) went away: worth resuming elsewhere.
    A request's own fault (INVALID_ARGUMENT, ...) or a replica bug (UNKNOWN with its message) is not."""
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        details = (e.details() or "").lower()
        return any(hint in details for hint in TRANSPORT_HINTS)
    return False


def attempt_error(e: grpc.aio.AioRpcError, endpoint: Endpoint) -> HttpError:
    """A replica call that failed before its answer began, as the client would see it; retryable on
    another replica when the replica refused for load or shutdown, or went away (`replica_lost`: a
    server stopping as the request arrived cancels it). The request never ran there either way."""
    error = HttpError.from_grpc(e, where=f"replica {endpoint.replica_id}")
    error.retryable = error.retryable or replica_lost(e)
    return error


class UpstreamStream:
    """An open Generate call whose first chunk has arrived (`first` is None if the stream was empty)."""

    def __init__(self, lease: Lease, call, first: replica_pb2.GenerateResponse | None):
        self.lease, self.call, self.first = lease, call, first
        self.first_at = time.monotonic()
        self.closed = False  # the proxy cancelled the call: a CANCELLED after this is its own doing

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

    def lost(self, e: grpc.aio.AioRpcError) -> bool:
        """The failure `e` of this call means its replica went away (and the proxy did not cancel it)."""
        return not self.closed and replica_lost(e)

    def close(self) -> None:
        """Cancels the call if it is still running and stops counting it as in flight (idempotent)."""
        self.closed = True
        self.call.cancel()
        self.lease.release()


def _retryable(e: BaseException) -> bool:
    return isinstance(e, HttpError) and e.retryable


async def open_stream(table: RouteCache, model: str, request: replica_pb2.GenerateRequest,
                      policy: RetryPolicy = RetryPolicy(), on_retry: Callable[[], None] = lambda: None,
                      tried: set[str] | None = None) -> UpstreamStream:
    """Picks a replica and waits for it to admit the call (at most policy.accept_timeout_s) and for its
    first chunk; on UNAVAILABLE/RESOURCE_EXHAUSTED, a lost replica (`attempt_error`) or no admission before it,
    backs off and tries another
    replica (calling `on_retry` for each such try). `tried` (addresses) are skipped, and every address
    tried here is added to it. Raises HttpError (no replica, all failed, bad request)."""
    async def attempt(endpoint: Endpoint) -> UpstreamStream:
        return await _open_on(table, endpoint, request, policy.accept_timeout_s)

    def pick(exclude: set[str]) -> Endpoint | None:  # the replica holding the prompt's prefix, within bounds
        return affinity_of(table).pick(table, model, request, exclude=exclude)
    return await on_some_replica(table, model, request.request_id, policy, attempt, on_retry, tried, pick)


async def on_some_replica(table: RouteCache, model: str, request_id: str, policy: RetryPolicy,
                          attempt_on: Callable[[Endpoint], Awaitable[T]], on_retry: Callable[[], None] = lambda: None,
                          tried: set[str] | None = None,
                          pick: Callable[[set[str]], Endpoint | None] | None = None) -> T:
    """Runs `attempt_on(endpoint)` on a replica `pick` chooses (default: power of two choices among those
    not in the excluded set); when it raises a retryable
    HttpError, backs off (exponential with jitter, tenacity) and tries a replica not tried yet, until
    policy's attempts or deadline run out. Raises the last HttpError, or 503 when no replica is left."""
    tried = set() if tried is None else tried
    pick = pick or (lambda exclude: power_of_two_choices(table, model, exclude))
    last: list[HttpError] = []
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.deadline_s),
        # exponential from backoff_initial_s, capped, plus up to backoff_initial_s of jitter (the stable
        # spelling of wait_exponential_jitter, whose `initial` argument newer tenacity deprecates)
        wait=wait_exponential(multiplier=policy.backoff_initial_s, max=policy.backoff_max_s)
        + wait_random(0, policy.backoff_initial_s),
        retry=retry_if_exception(_retryable), reraise=True)
    async for attempt in retrying:
        with attempt:
            endpoint = pick(tried)
            if endpoint is None:
                raise no_endpoint(model, last, others=bool(tried))
            if attempt.retry_state.attempt_number > 1:
                on_retry()
            tried.add(endpoint.address)
            try:
                return await attempt_on(endpoint)
            except HttpError as e:
                last.append(e)
                event(log, "upstream_attempt_failed", request_id=request_id, model=model,
                      replica=endpoint.replica_id, attempt=attempt.retry_state.attempt_number,
                      status=e.status, retry=e.retryable, error=e.message)
                raise
    raise AssertionError("unreachable: tenacity reraises the last error")


def no_endpoint(model: str, last: list[HttpError], others: bool) -> HttpError:
    if last:  # every endpoint was tried: the client sees what the last one said, not retried further
        e = last[-1]
        return HttpError(e.status, e.error_type, e.message, retryable=False)
    other = "other " if others else ""  # the ones tried earlier for this request are skipped
    return HttpError(503, "service_unavailable", f"no {other}ready replica for model {model!r}; try again shortly")


async def _open_on(table: RouteCache, endpoint: Endpoint, request: replica_pb2.GenerateRequest,
                   accept_timeout_s: float) -> UpstreamStream:
    lease = table.acquire(endpoint)
    call = replica_pb2_grpc.ReplicaStub(lease.channel).Generate(request)
    try:
        await accepted(call, endpoint, accept_timeout_s)
        first = await call.read()  # no time limit: an admitted request may wait in the replica's queue
    except grpc.aio.AioRpcError as e:
        call.cancel()
        lease.release()
        raise attempt_error(e, endpoint) from None
    except BaseException:
        call.cancel()
        lease.release()
        raise
    return UpstreamStream(lease, call, None if first is grpc.aio.EOF else first)


async def accepted(call, endpoint: Endpoint, timeout_s: float) -> None:
    """Waits for the call's initial metadata: a replica sends it when it admits the request (a failure
    brings it too). A hung replica (stopped process, open connection) never does: retryable 503."""
    try:
        await asyncio.wait_for(call.initial_metadata(), timeout_s)
    except TimeoutError:
        raise HttpError(503, "service_unavailable", f"replica {endpoint.replica_id} did not accept the "
                        f"request within {timeout_s:g}s", retryable=True) from None
