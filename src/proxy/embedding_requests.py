"""Turns an OpenAI embeddings request body into a replica EmbedRequest, or says why not (400 naming the field)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from gridserve.common.errors import NotFound
from gridserve.common.model_config import ModelConfig
from gridserve.common.request_contract import FieldError, lookup_model
from gridserve.proxy.openai_parse import ModelNotFound
from gridserve.proxy.request_body import json_object
from gridserve.v1 import replica_pb2

FIELDS = ("model", "input", "encoding_format", "dimensions", "user")
ENCODINGS = ("float", "base64")
MAX_INPUTS = 2048  # inputs in one request, as OpenAI allows
TOKEN_IDS = ("token-id inputs are not supported: gridserve's embedding models have their own tokenizer, so "
             "send the text itself (LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)")


@dataclass(frozen=True)
class EmbeddingsJob:
    """What an embeddings request asks of a replica, and how the vectors go back."""
    model: str
    embed: replica_pb2.EmbedRequest
    encoding_format: str = "float"


def parse_embeddings(body: bytes, content_type: str, path_model: str, models: Mapping[str, ModelConfig],
                     request_id: str) -> EmbeddingsJob:
    """POST /v1/embeddings: {"model", "input": text or list of texts, "encoding_format"?}."""
    data = {k: v for k, v in json_object(body).items() if v is not None}  # null means "not given"
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise FieldError(f"unrecognized request argument {unknown[0]!r} (supported: {', '.join(FIELDS)})",
                         unknown[0], "unknown_parameter")
    config = _model(data, models)
    if "dimensions" in data:
        raise FieldError(f"'dimensions' is not supported: model {config.name!r} returns its full-size vectors "
                         f"and they cannot be shortened; leave 'dimensions' out", "dimensions", "unsupported_parameter")
    encoding = data.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise FieldError(f"'encoding_format' must be \"float\" or \"base64\", got {_short(encoding)}",
                         "encoding_format")
    if "input" not in data:
        raise FieldError("'input' is required: a string or a list of strings to embed", "input")
    inputs = input_texts(data["input"])
    return EmbeddingsJob(config.name, replica_pb2.EmbedRequest(request_id=request_id, inputs=inputs), encoding)


def input_texts(value: Any) -> list[str]:
    """A non-empty string, or a list of 1 to MAX_INPUTS non-empty strings; token ids get their own 400."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise FieldError(f"'input' must be a string or a list of strings, got {_kind(value)}", "input")
    if not value:
        raise FieldError("'input' is an empty list: give at least one string to embed", "input")
    if len(value) > MAX_INPUTS:
        raise FieldError(f"'input' has {len(value)} items; at most {MAX_INPUTS} per request", "input")
    for i, item in enumerate(value):
        if _is_token_ids(item) or (isinstance(item, int) and not isinstance(item, bool)):
            raise FieldError(TOKEN_IDS, "input", "unsupported_input")
        if not isinstance(item, str):
            raise FieldError(f"input[{i}] must be a string, got {_kind(item)}", "input")
        if not item:
            raise FieldError(f"input[{i}] is an empty string: every input must have some text", "input")
    return value


def _is_token_ids(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)


def _model(data: dict, models: Mapping[str, ModelConfig]) -> ModelConfig:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise FieldError("'model' is required: the name of a deployed embedding model (see GET /v1/models)",
                         "model")
    try:
        return lookup_model(models, name)
    except NotFound as e:
        raise ModelNotFound(e.message) from None


def _kind(v: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number"}
    return names.get(type(v), type(v).__name__)


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."
