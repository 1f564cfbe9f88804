"""Turns an HTTP request body into a replica GenerateRequest, or says why not: the native chat format here,
and the checks both wire formats share (messages, prompt, sampling fields, JSON)."""
from __future__ import annotations

import json
import math
import re
import uuid
from typing import Any, Mapping

from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import InvalidRequest, NotFound
from gridserve.proxy.request_body import safe_json_loads
from gridserve.v1 import replica_pb2

ROLES = ("system", "user", "assistant")
EMPTY_BODY = ('request body is empty: send a user message as text, or JSON {"messages": [...]} / '
              '{"prompt": "..."}')
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
JSON_FIELDS = ("messages", "prompt", "model", *SAMPLING_FIELDS)
MAX_STOP = 4
MAX_TOP_K = 2**31 - 1
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id when it is sane (1-128 of [A-Za-z0-9._:-]), else a new one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class FieldError(InvalidRequest):
    """An invalid request that names the field at fault (OpenAI's `param`) and maybe a short `code`."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


def lookup_model(models: Mapping[str, ModelConfig], name: str) -> ModelConfig:
    """The config of a deployed model, or NotFound naming the deployed ones."""
    config = models.get(name)
    if config is None:
        deployed = ", ".join(sorted(models)) or "none"
        raise NotFound(f"model {name!r} is not deployed (deployed models: {deployed})")
    return config


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def parse_generate(body: bytes, content_type: str, config: ModelConfig,
                   request_id: str) -> replica_pb2.GenerateRequest:
    """A JSON body ({"messages"} or {"prompt"} plus sampling fields) or a plain-text user message."""
    text = _decode(body, EMPTY_BODY)
    request = replica_pb2.GenerateRequest(request_id=request_id)
    if not is_json(content_type):
        if not text.strip():
            raise InvalidRequest(EMPTY_BODY)
        request.chat.messages.add(role="user", content=text)
        return request
    data = _load_json(text)
    _check_fields(data, config)
    if "messages" in data:
        request.chat.CopyFrom(chat_messages(data["messages"]))
    else:
        request.prompt = prompt_text(data["prompt"])
    request.params.CopyFrom(sampling_params(data, config))
    return request


def json_object(body: bytes) -> dict:
    """A body that must be one JSON object (NaN and Infinity refused)."""
    return _load_json(_decode(body, "request body is empty: send a JSON object"))


def _decode(body: bytes, empty_message: str) -> str:
    if not body:
        raise InvalidRequest(empty_message)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not valid UTF-8 (byte {e.start})") from None


def _load_json(text: str) -> dict:
    return safe_json_loads(text)


def _check_fields(data: dict, config: ModelConfig) -> None:
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r} (known fields: {', '.join(JSON_FIELDS)})")
    if "model" in data and data["model"] != config.name:
        raise InvalidRequest(f"field 'model' is {_short(data['model'])} but the path names "
                             f"{config.name!r}; the model is chosen by the path")
    if ("messages" in data) == ("prompt" in data):
        raise InvalidRequest("give exactly one of 'messages' (chat, rendered with the model's "
                             "template) or 'prompt' (raw text)")


def chat_messages(value: Any, openai: bool = False) -> replica_pb2.ChatMessages:
    """A non-empty list of {role, content}. `openai` also takes what OpenAI clients send: the developer
    role (as system), content as a list of text parts, and a `name` (ignored)."""
    if not isinstance(value, list) or not value:
        raise FieldError(f"'messages' must be a non-empty list of {{role, content}} objects, got {_kind(value)}",
                         "messages")
    chat = replica_pb2.ChatMessages()
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FieldError(f"{where} must be an object with 'role' and 'content', got {_kind(m)}", where)
        known = {"role", "content", "name"} if openai else {"role", "content"}
        extra = sorted(k for k in set(m) - known if not (openai and m[k] is None))
        if extra:
            raise FieldError(f"{where}: unknown field {extra[0]!r} (known: {', '.join(sorted(known))})",
                             f"{where}.{extra[0]}")
        role = "system" if openai and m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise FieldError(f"{where}.role must be one of {', '.join(ROLES)}, got {_short(m.get('role'))}",
                             f"{where}.role")
        content = _text_parts(m.get("content"), where) if openai else m.get("content")
        if not isinstance(content, str):
            raise FieldError(f"{where}.content must be a string, got {_kind(content)}", f"{where}.content")
        chat.messages.add(role=role, content=content)
    return chat


def _text_parts(content: Any, where: str) -> Any:
    """OpenAI's content as a list of parts: text parts are joined; any other kind is refused."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else _kind(part)
            raise FieldError(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                             f"are supported, got {_short(kind)}", f"{where}.content")
        texts.append(part["text"])
    return "".join(texts)


def prompt_text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(f"'prompt' must be a non-empty string, got {_kind(value)}", "prompt")
    return value


def sampling_params(data: dict, config: ModelConfig) -> replica_pb2.SamplingParams:
    """The sampling fields given; unset ones stay unset and take the model's defaults on the replica."""
    p = replica_pb2.SamplingParams()
    limit = config.max_tokens_limit
    if "max_tokens" in data:
        p.max_tokens = _int(data, "max_tokens", 1, limit, f"an integer in [1, {limit}] (this model's limit)")
    if "temperature" in data:
        p.temperature = _number(data, "temperature", lambda v: 0 <= v <= 2, "a number in [0, 2]")
    if "top_p" in data:
        p.top_p = _number(data, "top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
    if "top_k" in data:
        p.top_k = _int(data, "top_k", 0, MAX_TOP_K, "an integer >= 0 (0 means no top-k cut)")
    if "seed" in data:
        p.seed = _int(data, "seed", 0, 2**64 - 1, "an integer in [0, 2^64)")
    if "stop" in data:
        p.stop.extend(_stop(data["stop"]))
    return p


def _int(data: dict, key: str, lo: int, hi: int, rule: str) -> int:
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise FieldError(f"'{key}' must be {rule}, got {_short(v)}", key)
    return v


def _number(data: dict, key: str, ok, rule: str) -> float:
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise FieldError(f"'{key}' must be {rule}, got {_short(v)}", key)
    return float(v)


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    rule = f"a non-empty string or a list of up to {MAX_STOP} non-empty strings"
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise FieldError(f"'stop' must be {rule}, got {_short(value)}", "stop")
    return stops


def _kind(v: Any) -> str:
    if v == "" or v == []:
        return "an empty string" if v == "" else "an empty list"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(v), type(v).__name__)


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."
