"""HttpError, what every failed request becomes, and the middleware that answers errors in the caller's format."""
from __future__ import annotations

import json
import logging
from typing import Callable

import grpc
from aiohttp import web

from gridserve.common.errors import GridserveError, http_from_grpc
from gridserve.common.eventlog import event

log = logging.getLogger("gridserve.proxy")

RETRY_AFTER_S = 1  # what 429/503 answers tell clients to wait before trying again
MAX_MESSAGE = 600  # characters of an error message; longer ones (echoing input) lose their middle

# Error types for statuses that aiohttp itself raises (unknown path, wrong method, body too big).
HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    417: "invalid_request_error",
    429: "overloaded_error",
    503: "service_unavailable",
}
# Their short machine-readable `code`.
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 417: "expectation_failed"}


class HttpError(Exception):
    """An error answer for an HTTP client: status, type, message; `param` names the request field at fault,
    `code` is a short machine-readable reason (both for OpenAI clients); `retryable` is for the upstream retry."""

    def __init__(self, status: int, error_type: str, message: str, retryable: bool = False,
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        message = cap_message(message)
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


def cap_message(message: str) -> str:
    """`message` cut to MAX_MESSAGE characters by dropping its middle, so an echoed input never makes it
    unbounded while the start (what is wrong) and the end (the hint) stay."""
    if len(message) <= MAX_MESSAGE:
        return message
    half = (MAX_MESSAGE - 5) // 2
    return f"{message[:half]} ... {message[-half:]}"


ErrorBody = Callable[[HttpError], dict]  # a wire format's error shape


def error_body(err: HttpError) -> dict:
    """The error shape outside the two APIs (unknown paths, health, readiness, rejected HTTP): OpenAI's,
    with a `code` always set."""
    return {"error": {"message": err.message, "type": err.error_type, "param": err.param,
                      "code": err.code or err.error_type}}


def error_response(err: HttpError, body: ErrorBody, headers: dict | None = None) -> web.Response:
    """The JSON answer for `err` in the shape `body` gives, with Retry-After on 429 and 503."""
    headers = {**(headers or {}), **err.headers}
    if err.status in (429, 503):
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return web.json_response(body(err), status=err.status, headers=headers)


def _from_http_exception(e: web.HTTPException) -> HttpError:
    headers = {}
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        message = f"method {e.method} is not allowed here (allowed: {allowed})"
        headers["Allow"] = allowed
    elif isinstance(e, web.HTTPNotFound):
        message = ("no such path; try POST /v1/chat/completions, POST /v1/completions, POST /v1/chat/{model}, "
                   "POST /v1/embeddings, GET /v1/models, GET /health, GET /ready or GET /metrics")
    else:
        message = e.text or e.reason
        if message.startswith(f"{e.status}: "):
            message = message[len(f"{e.status}: "):]
    return HttpError(e.status, HTTP_TYPES.get(e.status, "http_error"), message, code=HTTP_CODES.get(e.status),
                     headers=headers)


def escaped_errors_in_json(body_for: Callable[[web.Request], ErrorBody]):
    """An on_response_prepare hook: an aiohttp HTTP error raised outside the middleware (its Expect check runs
    before it) goes out in JSON too."""

    async def rewrite(request: web.Request, response: web.StreamResponse) -> None:
        if isinstance(response, web.HTTPException) and response.status >= 400:
            response.text = json.dumps(body_for(request)(_from_http_exception(response)))
            response.content_type = "application/json"

    return rewrite


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
