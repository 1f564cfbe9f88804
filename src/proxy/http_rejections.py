"""What aiohttp answers before any middleware runs (its HTTP parser refusing a request: a bad method, an
oversized header, Content-Length with Transfer-Encoding, bytes that are not HTTP), answered in JSON."""
from __future__ import annotations

import logging
import uuid

from aiohttp import http_exceptions as hx, web

from gridserve.common.eventlog import event
from gridserve.proxy.http_errors import HttpError, error_body, error_response

log = logging.getLogger("gridserve.proxy")


def rejection(status: int, exc: BaseException | None) -> HttpError:
    """The HttpError for what the parser (or aiohttp around a handler) refused with `status`."""
    if status == 500 and isinstance(exc, UnicodeError):  # aiohttp echoing a header's non-UTF-8 bytes
        return HttpError(400, "invalid_request_error", "a request header holds bytes that are not UTF-8",
                         code="bad_http_request")
    if status >= 500:
        if status == 504:
            return HttpError(504, "timeout_error", "the request timed out in the proxy", code="timeout")
        return HttpError(500, "internal_error", "internal error in the proxy")
    if isinstance(exc, hx.LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the"
        return HttpError(431, "invalid_request_error", f"the request line or a header is longer than {limit} "
                         "bytes", code="header_too_large")
    if isinstance(exc, hx.BadHttpMethod):  # also TLS sent to the plain HTTP port, which aiohttp names
        first = _first_line(exc)
        message = first if "HTTPS" in first else "unsupported or malformed HTTP method (the proxy serves GET, POST)"
        return HttpError(400, "invalid_request_error", message, code="invalid_method")
    if isinstance(exc, hx.ContentEncodingError) and "install" in _first_line(exc):
        return HttpError(415, "invalid_request_error", "this Content-Encoding is not supported (use gzip, deflate "
                         "or none)", code="unsupported_content_encoding")
    reason = _first_line(exc) if exc is not None else "bad request"
    if "too many headers" in reason.lower():
        return HttpError(431, "invalid_request_error", reason, code="too_many_headers")
    return HttpError(status, "invalid_request_error", f"malformed HTTP request: {reason}", code="bad_http_request")


def _first_line(exc: BaseException) -> str:
    lines = (getattr(exc, "message", "") or str(exc)).strip().splitlines()
    line = lines[0].rstrip(":").strip() if lines else type(exc).__name__
    return line if len(line) <= 120 else line[:117] + "..."


class _JsonRejections(web.RequestHandler):
    """aiohttp's connection protocol, with its error answer in the proxy's JSON error shape."""
    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer already began: aiohttp drops the connection
            return super().handle_error(request, status, exc, message)
        err = rejection(status, exc)
        if err.status >= 500:
            log.error("request failed outside the handlers", exc_info=exc)
        else:
            event(log, "http_rejected", status=err.status, code=err.code, error=err.message,
                  peer=request.remote or "")
        resp = error_response(err, error_body, headers={"X-Request-Id": uuid.uuid4().hex})
        resp.force_close()
        return resp


class _JsonRejectionsServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        handler = super().__call__()
        handler.__class__ = _JsonRejections  # same slots, one method more: the error answer
        return handler


def _not_answered_already(record: logging.LogRecord) -> bool:
    """False for aiohttp's traceback of a body that failed to decode: the handler already answered it 400."""
    return not (record.exc_info and isinstance(record.exc_info[1], web.RequestPayloadError))


_SERVER_LOG = logging.getLogger("aiohttp.server.proxy")  # aiohttp's connection log, less that noise
_SERVER_LOG.addFilter(_not_answered_already)


class JsonErrorsRunner(web.AppRunner):
    """web.AppRunner whose connections answer parser rejections in JSON. aiohttp 3.14 has no hook for those
    answers (aio-libs/aiohttp#3287, #6463): they come from RequestHandler.handle_error, so the runner's server
    makes connections of a subclass that overrides it."""

    def __init__(self, app: web.Application, **kwargs):
        super().__init__(app, logger=_SERVER_LOG, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonRejectionsServer
        return server
