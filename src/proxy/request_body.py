"""An HTTP request body as text or as one JSON object, and the request id a request is known by."""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from gridserve.common.errors import InvalidRequest
from gridserve.common.request_contract import kind

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
    return load_json_object(body_text(body, "request body is empty: send a JSON object"))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def load_json_object(text: str) -> dict:
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except ValueError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {kind(data)}")
    return data
