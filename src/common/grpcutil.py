"""gRPC helpers shared by every server and client: the error interceptor, channel options, health, reflection."""
from __future__ import annotations

import inspect
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gridserve.common.errors import GridserveError
from gridserve.common.eventlog import event
from gridserve.common.security import (Security, TokenInterceptor, channel_credentials, client_interceptors,
                                       server_credentials)

log = logging.getLogger("gridserve.grpc")

# Keepalive so a dead or frozen peer (cut link, SIGSTOP) is noticed in seconds, not at the TCP timeout.
# grpc-core waits grpc.http2.ping_timeout_ms (default 60 s) for a ping's answer, whatever
# keepalive_timeout_ms says: without it a stream from a frozen replica stalled until the scheduler killed it.
PING_TIMEOUT_MS = 5000
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


REQUEST_ID_METADATA = "x-request-id"


def request_id_of(request, context) -> str:
    """The request id a call carries: the request message's `request_id` field, else x-request-id metadata."""
    rid = getattr(request, "request_id", "")
    if isinstance(rid, str) and rid:
        return rid
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


async def _abort_for(e: Exception, method: str, request, context) -> None:
    """Ends the call with the status `e` stands for: its own code and message for a GridserveError; for
    anything else (a bug) INTERNAL with a short message, the traceback going to the log."""
    rid = request_id_of(request, context)
    fields = {"request_id": rid} if rid else {}
    if isinstance(e, GridserveError):
        event(log, "rpc_error", logging.INFO, method=method, code=e.grpc_code.name, error=e.message, **fields)
        await context.abort(e.grpc_code, e.message)
    log.error("rpc_failed method=%s error=%s%s", method, type(e).__name__,
              f" request_id={rid}" if rid else "", exc_info=e)
    where = f" (request id {rid})" if rid else ""
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error in {method}{where}: {type(e).__name__}; the server's log has the details")


def _wrap_unary(fn, method: str):
    async def handler(request, context):
        try:
            return await fn(request, context)
        except grpc.aio.AbortError:
            raise  # the handler set the status itself (context.abort)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status; cancellation passes
            await _abort_for(e, method, request, context)

    return handler


def _wrap_stream(fn, method: str):
    """A streaming handler as a coroutine that writes what `fn` yields and closes `fn` in its finally.
    As an async generator grpc would leave `fn` suspended at its `yield` when the call is cancelled during
    a write; asyncio then closes it later, after grpc has released the call, and a `finally` that touches
    the context (context.peer()) crashes the process (SIGSEGV in grpc_call_get_peer on a NULL call).
    Closed here, the handler's cleanup runs while the call is still alive."""
    if not inspect.isasyncgenfunction(fn):  # a reader/writer handler (grpc.health's Watch): nothing to close
        return _wrap_unary(fn, method)

    async def handler(request_or_iterator, context):
        responses = fn(request_or_iterator, context)
        try:
            while True:
                try:
                    item = await anext(responses)
                except StopAsyncIteration:
                    return
                except grpc.aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001
                    await _abort_for(e, method, request_or_iterator, context)
                await context.write(item)
        finally:
            await responses.aclose()

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps gridserve's named exceptions to gRPC status codes with their message, and any other exception
    to INTERNAL with a short message, logged with the call's request id, in one place."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method),
                handler.request_deserializer, handler.response_serializer)
        return handler


def make_server(security: Security | None = None) -> grpc.aio.Server:
    """A grpc.aio server with the token check (when the cluster has a token), the error interceptor and
    the keepalive settings every role uses."""
    interceptors = [TokenInterceptor(security.token)] if security and security.token else []
    return grpc.aio.server(interceptors=[*interceptors, ErrorInterceptor()], options=SERVER_OPTIONS)


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """Registers the standard grpc.health.v1 service; the caller sets statuses on what it returns."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


def add_reflection(server: grpc.aio.Server, *service_names: str) -> None:
    """Registers gRPC server reflection (grpc.reflection.v1alpha) listing `service_names`, health and
    reflection itself, so that grpcurl and similar tools can list and call the services. Like every
    method but health, it needs the cluster token (see TokenInterceptor)."""
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def bind(server: grpc.aio.Server, host: str, port: int, security: Security | None = None) -> int:
    """Binds host:port (port 0 picks a free one), with TLS when configured; returns the port bound."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    creds = server_credentials(security) if security else None
    bound = server.add_secure_port(target, creds) if creds else server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {target}")
    return bound


def channel(address: str, security: Security | None = None, options: list | tuple = ()) -> grpc.aio.Channel:
    """An aio channel that carries the cluster token and uses TLS when the cluster does."""
    opts = [*CHANNEL_OPTIONS, *options]
    interceptors = client_interceptors(security)
    creds = channel_credentials(security) if security else None
    if creds:
        return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)


async def check_health(ch: grpc.aio.Channel, service: str = "", timeout: float = 2.0) -> int:
    """One grpc.health.v1 Check; returns the ServingStatus (raises grpc.aio.AioRpcError when down)."""
    stub = health_pb2_grpc.HealthStub(ch)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return resp.status
