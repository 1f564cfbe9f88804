"""One path from an HTTP request to a replica and back for every wire format: parse, open, stream or collect
(moving to another replica mid-stream when one goes away), then log and count what happened."""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Mapping, Protocol

from aiohttp import web

from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import GridserveError
from gridserve.common.eventlog import event
from gridserve.common.request_contract import FinishReason
from gridserve.proxy.stream_resume import Upstreams
from gridserve.proxy.http_errors import ErrorBody, HttpError, error_response
from gridserve.proxy.request_metrics import UNKNOWN_MODEL, ProxyMetrics
from gridserve.proxy.load_report import LoadTracker
from gridserve.proxy.rate_limits import TOKENS_USED
from gridserve.proxy.request_body import read_body, request_id_from, safe_json_loads
from gridserve.proxy.model_tasks import check_task
from gridserve.proxy.route_cache import RouteCache, RouteWatcher
from gridserve.proxy.retry import RetryPolicy, UpstreamStream
from gridserve.proxy.zero_hold import ZeroHold
from gridserve.v1 import replica_pb2

log = logging.getLogger("gridserve.proxy")

@dataclass
class ProxyState:
    table: RouteCache
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    max_body_bytes: int = 1024 * 1024
    watcher: RouteWatcher | None = None
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    routes_wait_s: float = 5.0  # a request before the first routing table waits this long for it
    load: LoadTracker = field(default_factory=LoadTracker)  # requests per model, reported to the head
    zero_hold: ZeroHold = field(default_factory=ZeroHold)  # requests wait here while a model is at zero


STATE = web.AppKey("state", ProxyState)


@dataclass(frozen=True)
class Job:
    """What a wire format asks of a replica: the model, the GenerateRequest, and how the answer goes back."""
    model: str
    generate: replica_pb2.GenerateRequest
    stream: bool = True
    include_usage: bool = False  # OpenAI streams: a last chunk with the usage


@dataclass
class Result:
    """How a generation ended: finish reason (stop or length) and token counts."""
    finish: FinishReason = FinishReason.STOP
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Answer(Protocol):
    """A wire format's encoding of one answer: streamed pieces, or the whole body at once."""
    media_type: str

    def head(self) -> bytes: ...                       # right after the headers
    def delta(self, text: str) -> bytes: ...           # one text delta
    def tail(self, result: Result) -> bytes: ...       # after the last delta
    def failure(self, err: HttpError) -> bytes: ...    # a failure after the headers were sent
    def whole(self, text: str, result: Result) -> dict: ...  # the non-streaming body


# (body, content type, model named by the path, deployed models, request id) -> Job; raises GridserveError
Parse = Callable[[bytes, str, str, Mapping[str, ModelConfig], str], Job]


@dataclass(frozen=True)
class Wire:
    """A wire format on top of the one path: its name for logs and metrics, its parser, answers and errors."""
    api: str
    parse: Parse
    answer: Callable[[Job, str], Answer]
    error_body: ErrorBody
    task: str = "generate"  # the model task it serves; a model of another task is a 400


@dataclass
class RequestRecord:
    """What one request did, for its request_done line and the metrics."""
    request_id: str
    api: str
    metrics: ProxyMetrics
    model: str = ""
    known: bool = False              # the model is deployed: its name is a metrics label
    started: float = field(default_factory=time.monotonic)
    replica: str = ""                # the first replica (X-Replica-Id)
    final_replica: str = ""          # the one that ended the stream (another after a failover)
    failovers: int = 0
    status: int = 0
    outcome: str = "error"
    tokens: int = 0
    ttft_ms: float | None = None
    error: str = ""
    result: Result = field(default_factory=Result)
    _opened: bool = False
    _last_token_at: float = 0.0

    @property
    def label(self) -> str:
        return self.model if self.known else UNKNOWN_MODEL

    def opened(self, upstream: UpstreamStream) -> None:
        self._opened, self.replica = True, upstream.endpoint.replica_id
        ttft = upstream.first_at - self.started
        self.ttft_ms = round(ttft * 1000, 1)
        self.metrics.ttft.labels(self.label).observe(ttft)
        self.metrics.streams.labels(self.label).inc()

    def count(self, chunk: replica_pb2.GenerateResponse) -> None:
        n, now = len(chunk.token_ids), time.monotonic()
        if n and self.tokens:
            for _ in range(n):
                self.metrics.itl.labels(self.label).observe((now - self._last_token_at) / n)
        if n:
            self.tokens, self._last_token_at = self.tokens + n, now
        if chunk.HasField("usage"):
            self.result.prompt_tokens = chunk.usage.prompt_tokens
            self.result.completion_tokens = chunk.usage.completion_tokens
        finish = FinishReason.from_proto(chunk.finish_reason)
        if finish is not None:
            self.result.finish = finish

    def failed_mid_stream(self, err: HttpError) -> None:
        self.outcome, self.error = "upstream_error", err.message
        self.metrics.stream_errors.labels(self.label).inc()

    def done(self) -> None:
        completion = self.result.completion_tokens or self.tokens
        m = self.metrics
        m.requests.labels(self.api, self.label, str(self.status)).inc()
        if self._opened:
            m.streams.labels(self.label).dec()
            m.tokens.labels(self.label).inc(completion)
            m.prompt_tokens.labels(self.label).inc(self.result.prompt_tokens)
        ms = round((time.monotonic() - self.started) * 1000, 1)
        level = logging.WARNING if self.outcome == "upstream_error" or self.status >= 500 else logging.INFO
        event(log, "request_done", level, request_id=self.request_id, api=self.api, model=self.model,
              replica=self.replica, status=self.status, outcome=self.outcome, tokens=completion,
              ttft_ms="" if self.ttft_ms is None else self.ttft_ms, duration_ms=ms,
              failovers=self.failovers, final_replica=self.final_replica or self.replica,
              finish=self.result.finish if self.outcome == "ok" else "", error=self.error)


async def handle(request: web.Request, wire: Wire) -> web.StreamResponse:
    """Answers one generation request in `wire`'s format: an error status before the first token,
    then either a stream of pieces as they arrive or (not streaming) the whole answer."""
    state = request.app[STATE]
    rec = RequestRecord(request_id_from(request.headers.get("X-Request-Id")), wire.api, state.metrics,
                        model=request.match_info.get("model", ""))
    event(log, "request_start", request_id=rec.request_id, api=wire.api, model=rec.model)
    upstreams: Upstreams | None = None
    try:
        job = await parse_request(request, wire, state, rec)
        async with demand(state, job.model):
            failovers = state.metrics.failovers
            upstreams = Upstreams(state.table, job.model, job.generate, state.policy,
                                  on_retry=state.metrics.retries.labels(job.model).inc,
                                  on_failover=lambda outcome: failovers.labels(job.model, outcome).inc())
            rec.opened(await upstreams.open())
            answer = wire.answer(job, rec.request_id)
            if job.stream:
                return await _stream(request, upstreams, answer, rec)
            return await _collect(upstreams, answer, rec)
    except HttpError as e:  # before the first byte: a proper HTTP status
        rec.status, rec.error = e.status, e.message
        return error_response(e, wire.error_body, headers={"X-Request-Id": rec.request_id})
    except asyncio.CancelledError:  # the client went away (or the proxy is stopping)
        rec.outcome = "cancelled"
        rec.status = rec.status or 499
        raise
    finally:
        if upstreams is not None:
            upstreams.close()
            rec.final_replica, rec.failovers = upstreams.replica_id, upstreams.failovers
        request[TOKENS_USED] = rec.result.prompt_tokens + (rec.result.completion_tokens or rec.tokens)
        rec.done()


@asynccontextmanager
async def demand(state: ProxyState, model: str) -> AsyncIterator[None]:
    """A parsed request for `model`, for every endpoint: counted in the load the autoscaler sees until it ends,
    and held first while the model is scaled to zero (503 with Retry-After when the hold gives up)."""
    state.load.begin(model)
    try:
        await state.zero_hold.wait(state.table, model)
        yield
    finally:
        state.load.end(model)


async def parse_request(request: web.Request, wire: Wire, state: ProxyState, rec: RequestRecord) -> Job:
    if not await state.table.wait_received(state.routes_wait_s):  # a proxy just (re)started
        raise HttpError(503, "service_unavailable", "the proxy has no routing table from the head yet")
    body = await read_body(request, state.max_body_bytes)
    try:
        job = wire.parse(body, request.content_type, rec.model, state.table.models, rec.request_id)
    except GridserveError as e:
        rec.model = rec.model or _model_hint(body)
        rec.known = rec.model in state.table.routes
        if rec.known:  # a model of the other task explains a bad body better (max_tokens for minilm ...)
            check_task(state.table.models[rec.model], wire.task)
        raise HttpError.from_gridserve(e) from None
    rec.model, rec.known = job.model, True
    check_task(state.table.models[job.model], wire.task)
    return job


def _model_hint(body: bytes) -> str:
    """The "model" of a JSON body that failed to parse, for the log line and the metrics label."""
    try:
        model = safe_json_loads(body.decode()).get("model")
    except (GridserveError, UnicodeDecodeError):
        return ""
    return model[:128] if isinstance(model, str) else ""


async def _pump(upstreams: Upstreams, rec: RequestRecord, write: Callable[[str], Awaitable[None]]) -> None:
    """Hands every text delta to `write`, across failovers; raises HttpError when a replica fails for the
    request's own reasons mid-stream or no replica can continue it."""
    async with aclosing(upstreams.chunks()) as chunks:
        async for chunk in chunks:
            rec.count(chunk)
            if chunk.text:
                await write(chunk.text)
    rec.result.completion_tokens = rec.result.completion_tokens or rec.tokens  # a replica without usage


async def _stream(request: web.Request, upstreams: Upstreams, answer: Answer,
                  rec: RequestRecord) -> web.StreamResponse:
    """Sends 200 and each piece as it arrives; a failure no failover recovers ends the body with the wire's
    error piece."""
    resp = web.StreamResponse(status=200, headers={
        "X-Request-Id": rec.request_id, "X-Replica-Id": rec.replica,
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type, resp.charset = answer.media_type, "utf-8"
    if request.version == (1, 1):  # chunks are HTTP/1.1 only; older clients read until the connection closes
        resp.enable_chunked_encoding()

    async def write(data: bytes) -> None:
        if data:  # an empty write would end a chunked body
            await resp.write(data)

    try:
        await resp.prepare(request)
        rec.status = 200
        await write(answer.head())
        try:
            await _pump(upstreams, rec, lambda text: write(answer.delta(text)))
            await write(answer.tail(rec.result))
            rec.outcome = "ok"
        except HttpError as err:
            rec.failed_mid_stream(err)
            await write(answer.failure(err))
        await resp.write_eof()
    except ConnectionResetError:  # the client went away while we wrote
        rec.outcome, rec.status = "client_gone", rec.status or 499
    return resp


async def _collect(upstreams: Upstreams, answer: Answer, rec: RequestRecord) -> web.Response:
    """Gathers the whole answer; a failure on the way is still a proper error status (nothing was sent)."""
    parts: list[str] = []

    async def keep(text: str) -> None:
        parts.append(text)

    try:
        await _pump(upstreams, rec, keep)
    except HttpError as err:
        rec.failed_mid_stream(err)
        raise
    rec.status, rec.outcome = 200, "ok"
    return web.json_response(answer.whole("".join(parts), rec.result),
                             headers={"X-Request-Id": rec.request_id, "X-Replica-Id": rec.replica})
