"""The dashboard's HTTP side: the page and its static files, the JSON endpoints under /dashboard/api/ (cluster,
history, catalog), a replica's log as Server-Sent Events, and the admin actions relayed to the head."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import grpc
from aiohttp import web

from gridserve.common.eventlog import event
from gridserve.proxy.auth import ApiKeys
from gridserve.proxy.cluster_metrics import ClusterCollector, ClusterPoller
from gridserve.proxy.dashboard.access import Access
from gridserve.proxy.dashboard.cluster_view import cluster_json
from gridserve.proxy.dashboard.history import History
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.relay import ProxyState
from gridserve.proxy.route_cache import open_channel
from gridserve.proxy.settings import ProxyConfig
from gridserve.v1 import head_pb2, head_pb2_grpc

log = logging.getLogger("gridserve.proxy.dashboard")

STATIC_DIR = Path(__file__).parent / "static"
HEAD_TIMEOUT_S = 10.0
MAX_TAIL_LINES = 5000
MAX_REPLICAS = 64       # what one action may ask for
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DASHBOARD = web.AppKey("dashboard", object)


class Dashboard:
    """Reads the cluster view from the proxy's one ClusterPoller (the /metrics gauges' poll, every second while
    the page asks for the view), samples the history, and holds the channel the dashboard's admin calls and
    log streams go to the head on."""

    def __init__(self, state: ProxyState, cfg: ProxyConfig, poller: ClusterPoller):
        self.state, self.cfg, self.poller = state, cfg, poller
        self.access = Access(ApiKeys(cfg.api_keys), ApiKeys(cfg.admin_keys))
        self.history = History(state.metrics)
        self.started = time.time()
        self.channel: grpc.aio.Channel | None = None

    @property
    def collector(self) -> ClusterCollector:
        return self.poller.collector

    def head(self) -> head_pb2_grpc.AdminServiceStub:
        if self.channel is None:
            self.channel = open_channel(self.cfg.head, self.cfg.security)
        return head_pb2_grpc.AdminServiceStub(self.channel)

    async def run(self) -> None:
        """Samples the history every history.every_s (the replicas' Info as last polled) until cancelled;
        closes the head channel in finally."""
        try:
            while True:
                if self.history.due():
                    self.history.sample(self.collector.infos)
                await asyncio.sleep(self.history.every_s / 4)
        finally:
            if self.channel is not None:
                await self.channel.close()


def add_dashboard_routes(app: web.Application, state: ProxyState, cfg: ProxyConfig,
                         poller: ClusterPoller) -> Dashboard:
    """Adds /dashboard and /dashboard/api/*; the caller runs the returned Dashboard's run() as a task (and the
    poller's run(), which feeds /metrics too)."""
    dash = Dashboard(state, cfg, poller)
    app[DASHBOARD] = dash
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/", to_page)
    app.router.add_static("/dashboard/static", STATIC_DIR, append_version=False)
    app.router.add_get("/dashboard/api/config", config)
    app.router.add_get("/dashboard/api/cluster", cluster)
    app.router.add_get("/dashboard/api/history", history)
    app.router.add_get("/dashboard/api/catalog", catalog)
    app.router.add_get("/dashboard/api/logs", logs)
    for action in ("deploy", "scale", "undeploy"):
        app.router.add_post(f"/dashboard/api/admin/{action}", admin)
    return dash


def _dash(request: web.Request) -> Dashboard:
    return request.app[DASHBOARD]


async def page(request: web.Request) -> web.FileResponse:
    """GET /dashboard: the single page; it holds no data (that comes from /dashboard/api/ with a key)."""
    return web.FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


async def to_page(request: web.Request) -> web.Response:
    """GET /dashboard/: the page lives at /dashboard (its asset paths are absolute either way)."""
    raise web.HTTPFound("/dashboard")


async def config(request: web.Request) -> web.Response:
    """GET /dashboard/api/config: whether the page must ask for an API key and whether actions are on."""
    access = _dash(request).access
    return web.json_response({"api_keys_required": bool(access.api_keys), "actions_enabled": bool(access.admin_keys)})


async def cluster(request: web.Request) -> web.Response:
    """GET /dashboard/api/cluster: nodes, deployments, replicas (with their Info) and proxies."""
    dash = _dash(request)
    dash.access.check_read(request)
    await dash.poller.fresh(2 * dash.poller.fast_interval)  # the page asks every second; the poller keeps up
    return web.json_response(cluster_json(dash.collector, dash.state, dash.started))


async def history(request: web.Request) -> web.Response:
    """GET /dashboard/api/history: the chart series of the last 15 minutes."""
    dash = _dash(request)
    dash.access.check_read(request)
    return web.json_response(dash.history.to_json())


async def catalog(request: web.Request) -> web.Response:
    """GET /dashboard/api/catalog: the models the head can deploy (for the deploy form)."""
    dash = _dash(request)
    dash.access.check_read(request)
    resp = await _call_head(dash.head().Models(head_pb2.ModelsRequest(), timeout=HEAD_TIMEOUT_S))
    models = []
    for m in resp.models:
        description = m.model_config.description
        models.append({"name": m.name, "deployed": m.deployed, "replicas": m.replicas, "ready": m.ready,
                       "is_default": m.is_default, "description": description})
    return web.json_response({"models": models})


async def _call_head(call):
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        raise HttpError.from_grpc(e, "head") from None


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(request.query.get(name, default))
    except ValueError:
        raise HttpError(400, "invalid_request_error", f"{name} must be an integer", param=name) from None
    if not low <= value <= high:
        raise HttpError(400, "invalid_request_error", f"{name} must be in {low}..{high}", param=name)
    return value


async def logs(request: web.Request) -> web.StreamResponse:
    """GET /dashboard/api/logs?replica=ID&tail=N: the replica's log through the head's log relay (what
    `gridserve logs --follow` shows), as Server-Sent Events: one `line` event per line, `error` at the end
    if the stream broke. Leaving the page cancels the relay on the node."""
    dash = _dash(request)
    dash.access.check_read(request)
    replica = request.query.get("replica", "")
    if not replica:
        raise HttpError(400, "invalid_request_error", "replica must name a replica", param="replica")
    tail = _int_query(request, "tail", 200, 0, MAX_TAIL_LINES)
    status = dash.collector.status
    if status is not None and all(r.replica_id != replica for r in status.replicas):
        raise HttpError(404, "not_found_error", f"no replica {replica!r} in the cluster", param="replica")
    call = dash.head().Logs(head_pb2.LogsRequest(replica_id=replica, follow=True, tail_lines=tail))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    event(log, "dashboard_logs_opened", replica=replica, peer=request.remote or "")
    pending = b""
    try:
        async for piece in call:
            lines = (pending + piece.data).split(b"\n")
            pending = lines.pop()
            if lines:
                await resp.write(b"".join(_sse("line", ln.decode("utf-8", "replace")) for ln in lines))
        if pending:
            await resp.write(_sse("line", pending.decode("utf-8", "replace")))
        await resp.write(_sse("end", "the log stream ended"))
    except grpc.aio.AioRpcError as e:
        await resp.write(_sse("error", e.details() or e.code().name))
    except ConnectionResetError:
        pass
    finally:
        call.cancel()
        event(log, "dashboard_logs_closed", replica=replica)
    return resp


def _sse(kind: str, text: str) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(text)}\n\n".encode()


async def admin(request: web.Request) -> web.Response:
    """POST /dashboard/api/admin/{deploy,scale,undeploy}: a JSON body, relayed to the head's AdminService."""
    dash = _dash(request)
    dash.access.check_admin(request)
    action = request.path.rsplit("/", 1)[-1]
    body = await _json_object(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HttpError(400, "invalid_request_error", "model must be a non-empty string", param="model")
    head = dash.head()
    if action == "undeploy":
        call = head.Undeploy(head_pb2.UndeployRequest(model=model), timeout=HEAD_TIMEOUT_S)
    else:
        replicas = body.get("replicas", 1)
        low = 1 if action == "deploy" else 0
        if type(replicas) is not int or not low <= replicas <= MAX_REPLICAS:
            raise HttpError(400, "invalid_request_error", f"replicas must be an integer in {low}..{MAX_REPLICAS}",
                            param="replicas")
        if action == "deploy":
            node = body.get("node") or ""
            if not isinstance(node, str):
                raise HttpError(400, "invalid_request_error", "node must be a string", param="node")
            call = head.Deploy(head_pb2.DeployRequest(model=model, replicas=replicas, node=node),
                               timeout=HEAD_TIMEOUT_S)
        else:
            call = head.Scale(head_pb2.ScaleRequest(model=model, replicas=replicas), timeout=HEAD_TIMEOUT_S)
    resp = await _call_head(call)
    event(log, "dashboard_action", action=action, model=model, replicas=body.get("replicas", ""),
          peer=request.remote or "", message=resp.message)
    return web.json_response({"message": resp.message})


async def _json_object(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise HttpError(400, "invalid_request_error", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request_error", "the body must be a JSON object")
    return body
