"""The one HTTP error shape {"error": {"message", "type", "code"}} and the middleware that enforces it."""
from __future__ import annotations

import json
import logging

import grpc
from aiohttp import web

from gridserve.common.errors import GridserveError, http_from_grpc
from gridserve.common.logs import event

log = logging.getLogger("gridserve.proxy")

RETRY_AFTER_S = 1  # what 429/503 answers tell clients to wait before trying again

# Error types for statuses that aiohttp itself raises (unknown path, wrong method, body too big).
HTTP_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "overloaded_error",
    503: "service_unavailable",
}


class HttpError(Exception):
    """An error answer for an HTTP client: status, type, message; `retryable` is for the upstream retry."""

    def __init__(self, status: int, error_type: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.retryable = retryable

    @classmethod
    def from_gridserve(cls, e: GridserveError) -> "HttpError":
        return cls(e.http_status, e.error_type, e.message)

    @classmethod
    def from_grpc(cls, e: grpc.aio.AioRpcError, where: str = "") -> "HttpError":
        """A failed replica call as the client sees it: mapped status, the replica's own message."""
        status, error_type = http_from_grpc(e.code())
        message = e.details() or e.code().name
        if status >= 500 or status == 429:  # infrastructure trouble: say where; a 4xx speaks for itself
            message = f"{where}: {message}" if where else message
        retryable = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return cls(status, error_type, message, retryable)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "code": self.status}}

    def line(self) -> bytes:
        """The error as the last line of a stream that already sent tokens."""
        return ("\n" + json.dumps(self.body()) + "\n").encode()


def error_response(err: HttpError, headers: dict | None = None) -> web.Response:
    """The JSON answer for `err`, with Retry-After on 429 and 503."""
    headers = dict(headers or {})
    if err.status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return web.json_response(err.body(), status=err.status, headers=headers)


def _from_http_exception(e: web.HTTPException) -> HttpError:
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        message = f"method {e.method} is not allowed here (allowed: {allowed})"
    elif isinstance(e, web.HTTPNotFound):
        message = "no such path; try POST /v1/chat/{model}, GET /v1/models, GET /health or GET /ready"
    else:
        message = e.text or e.reason
        if message.startswith(f"{e.status}: "):
            message = message[len(f"{e.status}: "):]
    return HttpError(e.status, HTTP_TYPES.get(e.status, "http_error"), message)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Turns aiohttp's HTTP exceptions, named gridserve errors and crashes into the one JSON shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(_from_http_exception(e))
    except HttpError as e:
        return error_response(e)
    except GridserveError as e:
        return error_response(HttpError.from_gridserve(e))
    except Exception as e:  # a bug: answer 500 in the usual shape and keep serving
        event(log, "handler_crashed", logging.ERROR, path=request.path, error=repr(e))
        log.exception("handler crashed")
        return error_response(HttpError(500, "internal_error", "internal error in the proxy"))
