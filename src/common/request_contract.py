"""The one request contract: what a generation request may hold, each field's bounds (against the model's
limits), the error naming the field at fault, and how a generation ends. The proxy checks a client's
request with it once; the replica checks what arrives over gRPC with the same code."""
from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping

from gridserve.common.errors import InvalidRequest, NotFound
from gridserve.common.model_config import ModelConfig
from gridserve.v1 import replica_pb2

ROLES = ("system", "user", "assistant")
SCALAR_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed")  # optional in SamplingParams
SAMPLING_FIELDS = (*SCALAR_FIELDS, "stop")
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**64 - 1
MAX_STOP_STRINGS = 4    # as OpenAI
MAX_STOP_CHARS = 256
QUOTE_CHARS = 80        # a value quoted back in an error message is cut to this


class FieldError(InvalidRequest):
    """An invalid request that names the field at fault (OpenAI's `param`) and maybe a short `code`."""

    def __init__(self, message: str, param: str, code: str | None = None):
        super().__init__(message)
        self.param = clip(param)
        self.code = code


class FinishReason(enum.StrEnum):
    """Why a generation ended, from the engine to every wire (its value is what OpenAI clients see)."""
    STOP = "stop"        # EOS or a stop string
    LENGTH = "length"    # max_tokens reached, or the context is full
    ABORT = "abort"      # cancelled, or the replica is stopping

    def to_proto(self) -> int:
        return _TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: int) -> "FinishReason | None":
        """None for FINISH_REASON_UNSPECIFIED (a chunk that does not end the stream)."""
        return _FROM_PROTO.get(value)


_TO_PROTO = {FinishReason.STOP: replica_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: replica_pb2.FINISH_REASON_LENGTH,
             FinishReason.ABORT: replica_pb2.FINISH_REASON_ABORT}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def quote(value: Any) -> str:
    """A value as JSON, cut to QUOTE_CHARS: error messages never echo unbounded input."""
    try:
        text = json.dumps(value)  # ASCII: a lone surrogate cannot break a log line or a response
    except (TypeError, ValueError):
        text = repr(value)
    return clip(text)


def kind(value: Any) -> str:
    """What a JSON value is, in words, for "must be X, got Y"."""
    if value == "" or value == []:
        return "an empty string" if value == "" else "an empty list"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def lookup_model(models: Mapping[str, ModelConfig], name: str) -> ModelConfig:
    """The config of a deployed model, or NotFound naming the deployed ones."""
    config = models.get(name)
    if config is None:
        deployed = ", ".join(sorted(models)) or "none"
        raise NotFound(f"model {clip(name)!r} is not deployed (deployed models: {deployed})")
    return config


# Field checks. Floats are checked as the float32 the wire carries, so the proxy and the replica, which
# sees only that float32, always reach the same verdict (1e-300 is 0 on the wire).

def _float32(v: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _integer(name: str, v: Any, lo: int, hi: int, rule: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise FieldError(f"'{name}' must be {rule}, got {quote(v)}", name)
    return v


def _number(name: str, v: Any, ok, rule: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(_float32(v)):
        raise FieldError(f"'{name}' must be {rule}, got {quote(v)}", name)
    return _float32(v)


def _stop(v: Any) -> tuple[str, ...]:
    stops = [v] if isinstance(v, str) else v
    rule = (f"a non-empty string or a list of up to {MAX_STOP_STRINGS} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters")
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise FieldError(f"'stop' must be {rule}, got {quote(v)}", "stop")
    return tuple(stops)


@dataclass(frozen=True)
class SamplingOptions:
    """Resolved per-request sampling: every field set (the model's defaults filled in)."""
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sampling:
    """The sampling fields a request gave, each checked; None takes the model's default."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], config: ModelConfig) -> "Sampling":
        """Checks the SAMPLING_FIELDS present in `fields` (others are ignored), or FieldError naming one."""
        limit = config.max_tokens_limit
        checks = {
            "max_tokens": lambda v: _integer("max_tokens", v, 1, limit,
                                             f"an integer in [1, {limit}] (model {config.name!r}'s limit)"),
            "temperature": lambda v: _number("temperature", v, lambda x: 0 <= x <= MAX_TEMPERATURE,
                                             f"a number in [0, {MAX_TEMPERATURE:g}]"),
            "top_p": lambda v: _number("top_p", v, lambda x: 0 < x <= 1, "a number in (0, 1]"),
            "top_k": lambda v: _integer("top_k", v, 0, MAX_TOP_K,
                                        f"an integer in [0, {MAX_TOP_K}] (0 means no top-k cut)"),
            "seed": lambda v: _integer("seed", v, 0, MAX_SEED, "an integer in [0, 2^64)"),
            "stop": _stop,
        }
        return cls(**{name: check(fields[name]) for name, check in checks.items() if name in fields})

    @classmethod
    def from_proto(cls, params: replica_pb2.SamplingParams, config: ModelConfig) -> "Sampling":
        fields: dict[str, Any] = {name: getattr(params, name) for name in SCALAR_FIELDS
                                  if params.HasField(name)}
        if params.stop:
            fields["stop"] = list(params.stop)
        return cls.from_fields(fields, config)

    def to_proto(self) -> replica_pb2.SamplingParams:
        p = replica_pb2.SamplingParams(stop=self.stop)
        for name in SCALAR_FIELDS:
            if getattr(self, name) is not None:
                setattr(p, name, getattr(self, name))
        return p

    def resolve(self, config: ModelConfig) -> SamplingOptions:
        """Every field set: the model's defaults for those not given. Temperatures under 5e-7 round to 0
        (greedy); top_p keeps 6 significant digits, so a positive one stays positive."""
        d = config.sampling
        return SamplingOptions(
            max_tokens=_given_or(self.max_tokens, d.max_new_tokens),
            temperature=round(float(_given_or(self.temperature, d.temperature)), 6),
            top_p=float(f"{_given_or(self.top_p, d.top_p):.6g}"),
            top_k=_given_or(self.top_k, d.top_k), seed=self.seed, stop=self.stop)


def _given_or(given, default):
    return default if given is None else given


def check_messages(messages: list[tuple[Any, Any]]) -> tuple[tuple[str, str], ...]:
    """A non-empty list of (role, content) with a known role and text content, or FieldError."""
    if not messages:
        raise FieldError("'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise FieldError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {quote(role)}",
                             f"messages[{i}].role")
        if not isinstance(content, str):
            raise FieldError(f"messages[{i}].content must be a string, got {kind(content)}",
                             f"messages[{i}].content")
    return tuple(messages)


def check_prompt(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(f"'prompt' must be a non-empty string, got {kind(value)}", "prompt")
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: raw text `prompt` or chat `messages` (exactly one), and its sampling fields."""
    request_id: str
    sampling: Sampling
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    resume_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_proto(cls, request: replica_pb2.GenerateRequest, config: ModelConfig) -> "GenerationRequest":
        """What arrived over gRPC, checked by the same rules as at the proxy; FieldError when malformed."""
        sampling = Sampling.from_proto(request.params, config)
        which = request.WhichOneof("input")
        if which == "prompt":
            return cls(request.request_id, sampling, prompt=check_prompt(request.prompt),
                       resume_token_ids=tuple(request.resume_token_ids))
        if which == "chat":
            messages = check_messages([(m.role, m.content) for m in request.chat.messages])
            return cls(request.request_id, sampling, messages=messages,
                       resume_token_ids=tuple(request.resume_token_ids))
        raise FieldError("the request has no input: give 'messages' or 'prompt'", "messages")

    def to_proto(self) -> replica_pb2.GenerateRequest:
        request = replica_pb2.GenerateRequest(request_id=self.request_id, params=self.sampling.to_proto(),
                                              resume_token_ids=self.resume_token_ids)
        if self.messages is not None:
            request.chat.messages.extend(replica_pb2.ChatMessage(role=r, content=c) for r, c in self.messages)
        else:
            request.prompt = self.prompt
        return request
