"""The proxy's aiohttp app: the generation endpoints of both wire formats, embeddings, models, health,
readiness, metrics, and the process lifecycle."""
from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web
from prometheus_client import disable_created_metrics

from gridserve.common.errors import FatalError, NotFound
from gridserve.common.eventlog import event
from gridserve.common.files import write_port_file
from gridserve.common.service import Stop
from gridserve.proxy import native_wire as native, openai_wire as openai_api
from gridserve.proxy.auth import ApiKeys, auth_middleware
from gridserve.proxy.cluster_metrics import ClusterCollector, ClusterPoller
from gridserve.proxy.dashboard import add_dashboard_routes
from gridserve.proxy.embeddings import embeddings
from gridserve.proxy.settings import ProxyConfig
from gridserve.proxy.http_errors import ErrorBody, HttpError, error_body, error_middleware, escaped_errors_in_json
from gridserve.proxy.http_rejections import JsonErrorsRunner
from gridserve.proxy.request_metrics import ProxyMetrics
from gridserve.proxy.openai_parse import ModelNotFound
from gridserve.proxy.relay import STATE, ProxyState, Wire, handle
from gridserve.common.request_contract import lookup_model
from gridserve.proxy.request_body import request_id_from
from gridserve.proxy.load_report import LoadReporter
from gridserve.proxy.zero_hold import ZeroHold, scales_to_zero
from gridserve.proxy.replica_picker import use_routing
from gridserve.proxy.rate_limits import RateLimiter, add_ratelimit_headers, rate_limit_middleware
from gridserve.proxy.route_cache import RouteCache, RouteWatcher
from gridserve.proxy.retry import RetryPolicy

log = logging.getLogger("gridserve.proxy")


def error_body_for(request: web.Request) -> ErrorBody:
    """The error shape of the API a path belongs to: OpenAI's for the OpenAI paths, the native one for the
    native path, OpenAI's with a code always set elsewhere (unknown paths, health, readiness)."""
    if openai_api.is_openai_path(request.path):
        return openai_api.error_body
    return native.error_body if native.is_native_path(request.path) else error_body


async def _request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries X-Request-Id: the client's when it is sane, else a new one (unless set already)."""
    if "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = request_id_from(request.headers.get("X-Request-Id"))


def make_app(state: ProxyState, keys: ApiKeys = ApiKeys(), limiter: RateLimiter | None = None) -> web.Application:
    middlewares = [error_middleware(error_body_for)]
    if keys:
        middlewares.append(auth_middleware(keys, state.metrics.auth_failures.inc))
    if keys and limiter:
        middlewares.append(rate_limit_middleware(limiter, lambda kind: state.metrics.rate_limited.labels(kind).inc()))
    app = web.Application(middlewares=middlewares, client_max_size=state.max_body_bytes)
    app.on_response_prepare.append(add_ratelimit_headers)
    app[STATE] = state
    app.on_response_prepare.extend([escaped_errors_in_json(error_body_for), _request_id])
    app.router.add_post("/v1/chat/completions", _generate(openai_api.CHAT))
    app.router.add_post("/v1/completions", _generate(openai_api.COMPLETIONS))
    app.router.add_post("/v1/chat/{model}", _generate(native.WIRE))  # after /v1/chat/completions
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app


def _generate(wire: Wire):
    async def generate(request: web.Request) -> web.StreamResponse:
        return await handle(request, wire)

    generate.__doc__ = f"POST: a generation request in the {wire.api} format."
    return generate


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the deployed models (OpenAI's list shape) and how many READY replicas each has."""
    table = request.app[STATE].table
    data = [openai_api.model_object(name, route) for name, route in sorted(table.routes.items())]
    return web.json_response({"object": "list", "data": data})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: one deployed model, or 404."""
    table, name = request.app[STATE].table, request.match_info["model"]
    try:
        lookup_model(table.models, name)
    except NotFound as e:
        raise ModelNotFound(e.message) from None
    return web.json_response(openai_api.model_object(name, table.routes[name]))


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text exposition of the request metrics and the cluster gauges."""
    body, content_type = request.app[STATE].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 while the process is up (with what it knows of the head)."""
    state = request.app[STATE]
    return web.json_response({"status": "ok", "routes_version": state.table.version,
                              "head_connected": bool(state.watcher and state.watcher.connected)})


async def ready(request: web.Request) -> web.Response:
    """GET /ready: 200 when every deployed model has a READY replica (or is scaled to zero: it starts on
    demand), else 503 naming those that lack one."""
    table = request.app[STATE].table
    if not table.received:
        raise HttpError(503, "service_unavailable", "not ready: no routing table from the head yet")
    if not table.routes:
        raise HttpError(503, "service_unavailable", "not ready: no model is deployed")
    lacking = sorted(name for name, route in table.routes.items()
                     if not route.endpoints and not scales_to_zero(route))  # at zero: starts on demand
    if lacking:
        raise HttpError(503, "service_unavailable", f"not ready: no ready replica for {', '.join(lacking)}")
    counts = {name: len(route.endpoints) for name, route in sorted(table.routes.items())}
    zero = [name for name, route in sorted(table.routes.items()) if not route.endpoints]
    return web.json_response({"status": "ready", "models": counts, **({"scaled_to_zero": zero} if zero else {})})


async def _listen(runner: web.AppRunner, cfg: ProxyConfig) -> int:
    site = web.TCPSite(runner, cfg.host, cfg.port)
    try:
        await site.start()
    except OSError as e:
        raise FatalError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    return runner.addresses[0][1]


async def serve(cfg: ProxyConfig, stop: Stop) -> int:
    """Runs the proxy until `stop` (SIGTERM/SIGINT); open streams get cfg.shutdown_grace_s to finish."""
    disable_created_metrics()  # no *_created series: they double the exposition for little use
    table = RouteCache(security=cfg.security)
    use_routing(table, cfg.routing)
    watcher = RouteWatcher(cfg.head, table)
    policy = RetryPolicy(attempts=cfg.retry_attempts, deadline_s=cfg.retry_deadline_s,
                         accept_timeout_s=cfg.accept_timeout_s, max_failovers=cfg.max_failovers)
    state = ProxyState(table, policy, cfg.max_body_bytes, watcher, ProxyMetrics())
    collector = ClusterCollector()
    state.metrics.registry.register(collector)
    poller = ClusterPoller(cfg.head, table, collector, cfg.metrics_interval_s,
                           on_poll=lambda: state.metrics.known_models(table.routes))
    limiter = RateLimiter(cfg.api_key_limits)
    app = make_app(state, ApiKeys(cfg.api_keys), limiter)
    dashboard = add_dashboard_routes(app, state, cfg, poller)
    runner = JsonErrorsRunner(app, handler_cancellation=True, access_log=None,
                              shutdown_timeout=cfg.shutdown_grace_s)
    await runner.setup()
    reporter = LoadReporter(cfg.head, table, state.load, limiter=limiter)
    state.zero_hold = ZeroHold(cfg.zero_hold_timeout_s, cfg.zero_hold_max, on_hold=reporter.nudge)
    tasks = [asyncio.create_task(t.run()) for t in (watcher, poller, reporter, dashboard)]
    try:
        port = await _listen(runner, cfg)
        if cfg.port_file:
            write_port_file(cfg.port_file, port)
        event(log, "proxy_listening", host=cfg.host, port=port, head=cfg.head, pid=os.getpid(),
              api_keys=len(cfg.api_keys), routing=cfg.routing)
        await stop.wait()
        event(log, "proxy_stopping", signal=stop.signal)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        await table.close()
    event(log, "proxy_stopped")
    return 0
