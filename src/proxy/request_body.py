"""Reading a request body safely: its content encoding and framing, then text or one JSON object that is
neither too deep nor holding text that cannot be encoded (lone surrogates), each refused as a 4xx naming what
is wrong; and the request id a request is known by."""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError

from gridserve.common.errors import InvalidRequest
from gridserve.common.request_contract import kind
from gridserve.proxy.http_errors import HttpError

MAX_DEPTH = 32  # nested objects/lists in a JSON body; real requests need 4 or 5
ENCODINGS = ("identity", "gzip", "deflate")  # Content-Encoding values the proxy decodes
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id when it is sane (1-128 of [A-Za-z0-9._:-]), else a new one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def body_text(body: bytes, empty_message: str) -> str:
    """The body as UTF-8 text; InvalidRequest when it is empty or not UTF-8."""
    if not body:
        raise InvalidRequest(empty_message)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {e.start})") from None


def json_object(body: bytes) -> dict:
    """A body that must be one JSON object (NaN and Infinity refused)."""
    return safe_json_loads(body_text(body, "request body is empty: send a JSON object"))


class BodyError(InvalidRequest):
    """A JSON body that parses but cannot be used; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The decoded body, or HttpError: 415 for a content encoding the proxy does not decode, 413 past
    `max_bytes` (after decoding), 400 when the body is not what its headers say (bad gzip, bad chunks)."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding and encoding not in ENCODINGS:
        raise HttpError(415, "invalid_request_error",
                        f"Content-Encoding {_quote(encoding)} is not supported (use gzip, deflate or none)",
                        code="unsupported_content_encoding")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, "request_too_large",
                        f"request body is larger than the limit of {max_bytes} bytes",
                        code="request_too_large") from None
    except web.RequestPayloadError as e:
        if isinstance(e.__cause__, ContentEncodingError):
            message = f"request body is not valid {encoding} data (Content-Encoding: {encoding})"
        else:
            lines = str(e.__cause__ or e).strip().splitlines()
            message = f"request body is malformed: {lines[0][:120] if lines else type(e).__name__}"
        raise HttpError(400, "invalid_request_error", message, code="invalid_body") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def safe_json_loads(text: str) -> dict:
    """One JSON object (NaN and Infinity refused), at most MAX_DEPTH deep, every string and key valid
    Unicode; else InvalidRequest naming the field at fault."""
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise BodyError(f"request body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {kind(data)}")
    _check(data, "", 1)
    return data


def _check(value: Any, where: str, depth: int) -> None:
    """Walks the parsed body: refuses nesting past MAX_DEPTH and strings with lone surrogates."""
    if isinstance(value, str):
        if not _encodable(value):
            raise BodyError(f"{where or 'the body'} holds invalid Unicode (a lone surrogate such as "
                            f"\\ud800); send UTF-8 text", where or None, "invalid_unicode")
        return
    if not isinstance(value, (dict, list)):
        return
    if depth > MAX_DEPTH:
        raise BodyError(f"request body is nested more than {MAX_DEPTH} levels deep (at {where})", where or None)
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(key, str):
            if not _encodable(key):
                raise BodyError(f"a field name in {where or 'the body'} holds invalid Unicode (a lone "
                                f"surrogate); send UTF-8 text", where or None, "invalid_unicode")
            path = f"{where}.{_name(key)}" if where else _name(key)
        else:
            path = f"{where}[{key}]"
        _check(item, path, depth + 1)


def _encodable(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name(key: str) -> str:
    return key if len(key) <= 64 else key[:61] + "..."


def _quote(value: str, limit: int = 64) -> str:
    """`value` quoted for an error message, cut to `limit` characters."""
    shown = value if len(value) <= limit else value[:limit - 3] + "..."
    return json.dumps(shown)
