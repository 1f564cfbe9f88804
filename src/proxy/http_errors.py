"""HttpError, what every failed request becomes, and the middleware that answers errors in the caller's format."""
from __future__ import annotations

import logging
from typing import Callable

import grpc
from aiohttp import web

from gridserve.common.errors import GridserveError, http_from_grpc
from gridserve.common.eventlog import event

log = logging.getLogger("gridserve.proxy")

RETRY_AFTER_S = 1  # what 429/503 answers tell clients to wait before trying again

# Error types for statuses that aiohttp itself raises (unknown path, wrong method, body too big).
HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "overloaded_error",
    503: "service_unavailable",
}


class HttpError(Exception):
    """An error answer for an HTTP client: status, type, message; `param` names the request field at fault,
    `code` is a short machine-readable reason (both for OpenAI clients); `retryable` is for the upstream retry."""

    def __init__(self, status: int, error_type: str, message: str, retryable: bool = False,
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.retryable = retryable
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def from_gridserve(cls, e: GridserveError) -> "HttpError":
        return cls(e.http_status, e.error_type, e.message, param=getattr(e, "param", None),
                   code=getattr(e, "code", None))

    @classmethod
    def from_grpc(cls, e: grpc.aio.AioRpcError, where: str = "") -> "HttpError":
        """A failed replica call as the client sees it: mapped status, the replica's own message."""
        status, error_type = http_from_grpc(e.code())
        message = e.details() or e.code().name
        if status >= 500 or status == 429:  # infrastructure trouble: say where; a 4xx speaks for itself
            message = f"{where}: {message}" if where else message
        retryable = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return cls(status, error_type, message, retryable)


ErrorBody = Callable[[HttpError], dict]  # a wire format's error shape


def error_response(err: HttpError, body: ErrorBody, headers: dict | None = None) -> web.Response:
    """The JSON answer for `err` in the shape `body` gives, with Retry-After on 429 and 503."""
    headers = {**(headers or {}), **err.headers}
    if err.status in (429, 503):
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return web.json_response(body(err), status=err.status, headers=headers)


def _from_http_exception(e: web.HTTPException) -> HttpError:
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        message = f"method {e.method} is not allowed here (allowed: {allowed})"
    elif isinstance(e, web.HTTPNotFound):
        message = ("no such path; try POST /v1/chat/completions, POST /v1/completions, POST /v1/chat/{model}, "
                   "GET /v1/models, GET /health, GET /ready or GET /metrics")
    else:
        message = e.text or e.reason
        if message.startswith(f"{e.status}: "):
            message = message[len(f"{e.status}: "):]
    return HttpError(e.status, HTTP_TYPES.get(e.status, "http_error"), message)


def error_middleware(body_for: Callable[[web.Request], ErrorBody]):
    """Turns aiohttp's HTTP exceptions, named errors and crashes into JSON in the shape of the request's API."""

    @web.middleware
    async def json_errors(request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(_from_http_exception(e), body_for(request))
        except HttpError as e:
            return error_response(e, body_for(request))
        except GridserveError as e:
            return error_response(HttpError.from_gridserve(e), body_for(request))
        except Exception as e:  # a bug: answer 500 in the usual shape and keep serving
            event(log, "handler_crashed", logging.ERROR, path=request.path, error=repr(e))
            log.exception("handler crashed")
            return error_response(HttpError(500, "internal_error", "internal error in the proxy"), body_for(request))

    return json_errors
