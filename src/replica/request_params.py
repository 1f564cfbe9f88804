"""Checks a GenerateRequest and resolves its input and sampling params against the model's config."""
from __future__ import annotations

import math
from dataclasses import dataclass

from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import InvalidRequest

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class SamplingOptions:
    """Resolved per-request sampling: every field set (defaults filled in and checked)."""
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def resolve_sampling(params, model: ModelConfig) -> SamplingOptions:
    """A SamplingParams message (unset fields take the model's defaults) to SamplingOptions, or InvalidRequest."""
    d = model.sampling
    max_tokens = params.max_tokens if params.HasField("max_tokens") else d.max_new_tokens
    if not 1 <= max_tokens <= model.max_tokens_limit:
        raise InvalidRequest(f"max_tokens must be in [1, {model.max_tokens_limit}] for model "
                             f"'{model.name}', got {max_tokens}")
    temperature = params.temperature if params.HasField("temperature") else d.temperature
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise InvalidRequest(f"temperature must be in [0, 2], got {temperature:g}")
    top_p = params.top_p if params.HasField("top_p") else d.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p:g}")
    top_k = params.top_k if params.HasField("top_k") else d.top_k
    stop = tuple(params.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
    return SamplingOptions(
        max_tokens=int(max_tokens), temperature=round(float(temperature), 6), top_p=round(float(top_p), 6),
        top_k=int(top_k), seed=int(params.seed) if params.HasField("seed") else None, stop=stop)


def resolve_input(request) -> tuple[str, str | list[tuple[str, str]]]:
    """("prompt", text) or ("chat", [(role, content), ...]) from a GenerateRequest, or InvalidRequest."""
    which = request.WhichOneof("input")
    if which == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt is empty")
        return "prompt", request.prompt
    if which == "chat":
        messages = [(m.role, m.content) for m in request.chat.messages]
        if not messages:
            raise InvalidRequest("chat has no messages")
        for i, (role, _) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidRequest(f"chat message {i}: unknown role {role!r} (use one of {', '.join(CHAT_ROLES)})")
        return "chat", messages
    raise InvalidRequest("the request has no input: set prompt or chat")
