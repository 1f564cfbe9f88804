"""The proxy's aiohttp app: chat streaming, models, health and readiness, and the process lifecycle."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web

from gridserve.common.errors import FatalError, GridserveError
from gridserve.common.logs import event
from gridserve.proxy.config import ProxyConfig
from gridserve.proxy.http_errors import HttpError, error_response, json_errors
from gridserve.proxy.requests import lookup_model, parse_generate, request_id_from
from gridserve.proxy.routes import RouteTable, RouteWatcher
from gridserve.proxy.upstream import RetryPolicy, UpstreamStream, open_stream
from gridserve.v1 import replica_pb2

log = logging.getLogger("gridserve.proxy")


@dataclass
class ProxyState:
    table: RouteTable
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    max_body_bytes: int = 1024 * 1024
    watcher: RouteWatcher | None = None


STATE = web.AppKey("state", ProxyState)


@dataclass
class RequestRecord:
    """What request_done logs about one chat request."""
    request_id: str
    model: str
    started: float = field(default_factory=time.monotonic)
    replica: str = ""
    status: int = 0
    outcome: str = "error"
    tokens: int = 0
    usage_tokens: int = 0
    ttft_ms: float | None = None
    finish: str = ""
    error: str = ""

    def count(self, chunk: replica_pb2.GenerateResponse) -> None:
        self.tokens += len(chunk.token_ids)
        if chunk.usage.completion_tokens:
            self.usage_tokens = chunk.usage.completion_tokens
        if chunk.finish_reason:
            self.finish = replica_pb2.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_")

    def log_done(self) -> None:
        ms = round((time.monotonic() - self.started) * 1000, 1)
        ttft = "" if self.ttft_ms is None else self.ttft_ms
        level = logging.WARNING if self.outcome == "upstream_error" or self.status >= 500 else logging.INFO
        event(log, "request_done", level, request_id=self.request_id, model=self.model, replica=self.replica,
              status=self.status, outcome=self.outcome, tokens=self.usage_tokens or self.tokens,
              ttft_ms=ttft, duration_ms=ms, finish=self.finish, error=self.error)


def make_app(state: ProxyState) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=state.max_body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/chat/{model}", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    return app


async def chat(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/{model}: stream the reply as text/plain, one write per delta."""
    rec = RequestRecord(request_id_from(request.headers.get("X-Request-Id")), request.match_info["model"])
    event(log, "request_start", request_id=rec.request_id, model=rec.model)
    upstream: UpstreamStream | None = None
    try:
        upstream = await _open_upstream(request, rec)
        return await _relay(request, upstream, rec)
    except HttpError as e:  # before the first token: a proper HTTP status
        rec.status, rec.error = e.status, e.message
        return error_response(e, headers={"X-Request-Id": rec.request_id})
    except asyncio.CancelledError:  # the client went away (or the proxy is stopping)
        rec.outcome = "cancelled"
        rec.status = rec.status or 499
        raise
    finally:
        if upstream is not None:
            upstream.close()
        rec.log_done()


async def _open_upstream(request: web.Request, rec: RequestRecord) -> UpstreamStream:
    """Validates the request and waits for the first chunk from some replica (raises HttpError)."""
    state = request.app[STATE]
    if not state.table.received:
        raise HttpError(503, "service_unavailable", "the proxy has no routing table from the head yet")
    try:
        config = lookup_model(state.table.models, rec.model)
        body = await request.read()
        generate = parse_generate(body, request.content_type, config, rec.request_id)
    except GridserveError as e:
        raise HttpError.from_gridserve(e) from None
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, "request_too_large",
                        f"request body is larger than the limit of {state.max_body_bytes} bytes") from None
    upstream = await open_stream(state.table, rec.model, generate, state.policy)
    rec.replica = upstream.endpoint.replica_id
    rec.ttft_ms = round((upstream.first_at - rec.started) * 1000, 1)
    return upstream


async def _relay(request: web.Request, upstream: UpstreamStream, rec: RequestRecord) -> web.StreamResponse:
    """Sends 200 and relays every chunk as it arrives; a replica failure ends the body with a JSON line."""
    resp = web.StreamResponse(status=200, headers={
        "X-Request-Id": rec.request_id, "X-Replica-Id": rec.replica,
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    resp.content_type, resp.charset = "text/plain", "utf-8"
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        rec.status = 200
        try:
            async for chunk in upstream.chunks():
                rec.count(chunk)
                if chunk.text:
                    await resp.write(chunk.text.encode())
            rec.outcome = "ok"
        except grpc.aio.AioRpcError as e:  # mid-stream failover would go here (a later issue)
            err = HttpError.from_grpc(e, where=f"replica {rec.replica} failed mid-stream")
            rec.outcome, rec.error = "upstream_error", err.message
            await resp.write(err.line())
        await resp.write_eof()
    except ConnectionResetError:  # the client went away while we wrote
        rec.outcome = "client_gone"
    return resp


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the deployed models and how many READY replicas each has."""
    table = request.app[STATE].table
    data = [{"id": name, "object": "model", "owned_by": "gridserve", "ready_replicas": len(route.endpoints),
             "context_length": route.config.context_length, "max_tokens_limit": route.config.max_tokens_limit,
             "description": route.config.description}
            for name, route in sorted(table.routes.items())]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 while the process is up (with what it knows of the head)."""
    state = request.app[STATE]
    return web.json_response({"status": "ok", "routes_version": state.table.version,
                              "head_connected": bool(state.watcher and state.watcher.connected)})


async def ready(request: web.Request) -> web.Response:
    """GET /ready: 200 when every deployed model has a READY replica, else 503 naming those that lack one."""
    table = request.app[STATE].table
    if not table.received:
        raise HttpError(503, "service_unavailable", "not ready: no routing table from the head yet")
    if not table.routes:
        raise HttpError(503, "service_unavailable", "not ready: no model is deployed")
    lacking = sorted(name for name, route in table.routes.items() if not route.endpoints)
    if lacking:
        raise HttpError(503, "service_unavailable", f"not ready: no ready replica for {', '.join(lacking)}")
    counts = {name: len(route.endpoints) for name, route in sorted(table.routes.items())}
    return web.json_response({"status": "ready", "models": counts})


def write_port_file(path: str, port: int) -> None:
    """Writes the port atomically (tmp + rename) so readers never see a partial file."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, target)


async def _listen(runner: web.AppRunner, cfg: ProxyConfig) -> int:
    site = web.TCPSite(runner, cfg.host, cfg.port)
    try:
        await site.start()
    except OSError as e:
        raise FatalError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    return runner.addresses[0][1]


async def _until_signalled() -> str:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: got.done() or got.set_result(s.name))
    try:
        return await got
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def serve(cfg: ProxyConfig) -> int:
    """Runs the proxy until SIGTERM/SIGINT; open streams get cfg.shutdown_grace_s to finish."""
    table = RouteTable()
    watcher = RouteWatcher(cfg.head, table)
    policy = RetryPolicy(attempts=cfg.retry_attempts, deadline_s=cfg.retry_deadline_s)
    app = make_app(ProxyState(table, policy, cfg.max_body_bytes, watcher))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=cfg.shutdown_grace_s)
    await runner.setup()
    watch_task = asyncio.create_task(watcher.run())
    try:
        port = await _listen(runner, cfg)
        if cfg.port_file:
            write_port_file(cfg.port_file, port)
        event(log, "proxy_listening", host=cfg.host, port=port, head=cfg.head, pid=os.getpid())
        sig = await _until_signalled()
        event(log, "proxy_stopping", signal=sig)
    finally:
        watch_task.cancel()
        await asyncio.gather(watch_task, return_exceptions=True)
        await runner.cleanup()
        await table.close()
    event(log, "proxy_stopped")
    return 0
