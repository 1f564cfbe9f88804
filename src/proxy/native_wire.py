"""The native wire format: POST /v1/chat/{model} with a text or JSON body, answered as streamed text/plain."""
from __future__ import annotations

import json
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.relay import Job, Result, Wire
from gridserve.proxy.native_parse import parse


PATH_PREFIX = "/v1/chat/"


def is_native_path(path: str) -> bool:
    """POST /v1/chat/{model}: one path segment after /v1/chat/."""
    model = path[len(PATH_PREFIX):] if path.startswith(PATH_PREFIX) else ""
    return bool(model) and "/" not in model


def error_body(err: HttpError) -> dict:
    """The native error shape: {"error": {"message", "type", "param", "code"}} with the HTTP status as the
    code; `param` names the request field at fault (null when the fault is not one field's)."""
    return {"error": {"message": err.message, "type": err.error_type, "param": err.param, "code": err.status}}


class TextAnswer:
    """The reply as plain text, written as it comes; a failure after it began is one JSON error line."""
    media_type = "text/plain"

    def __init__(self, job: Job, request_id: str):
        pass

    def head(self) -> bytes:
        return b""

    def delta(self, text: str) -> bytes:
        return text.encode()

    def tail(self, result: Result) -> bytes:
        return b""

    def failure(self, err: HttpError) -> bytes:
        return ("\n" + json.dumps(error_body(err)) + "\n").encode()

    def whole(self, text: str, result: Result) -> dict:
        raise AssertionError("the native chat format always streams")


WIRE = Wire(api="chat", parse=parse, answer=TextAnswer, error_body=error_body)
