"""The native wire's request, top to bottom: POST /v1/chat/{model} with a plain-text user message, or a
JSON body ({"messages"} or {"prompt"} plus sampling fields), checked by the common request contract."""
from __future__ import annotations

from typing import Any, Mapping

from gridserve.common.errors import InvalidRequest
from gridserve.common.model_config import ModelConfig
from gridserve.common.request_contract import (SAMPLING_FIELDS, FieldError, GenerationRequest, Sampling,
                                               check_messages, check_prompt, clip, kind, lookup_model, quote)
from gridserve.proxy.relay import Job
from gridserve.proxy.request_body import body_text, is_json, safe_json_loads
from gridserve.v1 import replica_pb2

EMPTY_BODY = ('request body is empty: send a user message as text, or JSON {"messages": [...]} / '
              '{"prompt": "..."}')
JSON_FIELDS = ("messages", "prompt", "model", *SAMPLING_FIELDS)
MESSAGE_FIELDS = ("role", "content")


def parse(body: bytes, content_type: str, path_model: str, models: Mapping[str, ModelConfig],
          request_id: str) -> Job:
    """The Job for POST /v1/chat/{model}: the model named by the path, then the body."""
    config = lookup_model(models, path_model)
    return Job(config.name, parse_generate(body, content_type, config, request_id))


def parse_generate(body: bytes, content_type: str, config: ModelConfig,
                   request_id: str) -> replica_pb2.GenerateRequest:
    """A JSON body, or (any other content type) the whole body as one user message."""
    text = body_text(body, EMPTY_BODY)
    if not is_json(content_type):
        if not text.strip():
            raise InvalidRequest(EMPTY_BODY)
        return GenerationRequest(request_id, Sampling(), messages=(("user", text),)).to_proto()
    data = safe_json_loads(text)
    _check_fields(data, config)
    sampling = Sampling.from_fields(data, config)
    if "messages" in data:
        request = GenerationRequest(request_id, sampling, messages=_messages(data["messages"]))
    else:
        request = GenerationRequest(request_id, sampling, prompt=check_prompt(data["prompt"]))
    return request.to_proto()


def _check_fields(data: dict, config: ModelConfig) -> None:
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise FieldError(f"unknown field {clip(unknown[0])!r} (known fields: {', '.join(JSON_FIELDS)})", unknown[0])
    if "model" in data and data["model"] != config.name:
        raise FieldError(f"field 'model' is {quote(data['model'])} but the path names {config.name!r}; "
                         f"the model is chosen by the path", "model")
    if ("messages" in data) == ("prompt" in data):
        raise FieldError("give exactly one of 'messages' (chat, rendered with the model's template) or "
                         "'prompt' (raw text)", "messages")


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    """A non-empty list of {role, content} objects, nothing else in them."""
    if not isinstance(value, list) or not value:
        raise FieldError(f"'messages' must be a non-empty list of {{role, content}} objects, got {kind(value)}",
                         "messages")
    pairs = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FieldError(f"{where} must be an object with 'role' and 'content', got {kind(m)}", where)
        extra = sorted(set(m) - set(MESSAGE_FIELDS))
        if extra:
            raise FieldError(f"{where}: unknown field {clip(extra[0])!r} (known: {', '.join(MESSAGE_FIELDS)})",
                             f"{where}.{extra[0]}")
        pairs.append((m.get("role"), m.get("content")))
    return check_messages(pairs)
