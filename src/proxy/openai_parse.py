"""The OpenAI wire's requests, top to bottom: chat.completions and completions bodies into a replica Job,
checked by the common request contract; fields OpenAI clients send that gridserve cannot honour are refused
by name."""
from __future__ import annotations

import json
from typing import Any, Mapping

from gridserve.common.errors import NotFound
from gridserve.common.model_config import ModelConfig
from gridserve.common.request_contract import (FieldError, GenerationRequest, Sampling, check_messages,
                                               check_prompt, clip, kind, lookup_model, quote)
from gridserve.proxy.relay import Job
from gridserve.proxy.request_body import json_object

COMMON_FIELDS = ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed", "n",
                 "top_k")
CHAT_FIELDS = (*COMMON_FIELDS, "messages", "max_completion_tokens")
COMPLETION_FIELDS = (*COMMON_FIELDS, "prompt")
# Accepted and ignored whatever their value: they do not change the generated text.
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key")
# Accepted only at the value that changes nothing, which clients often send explicitly.
NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False, 0), "top_logprobs": (0,),
    "logit_bias": ({},), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
    "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},),
}
STREAM_OPTIONS = ("include_usage", "include_obfuscation")
MESSAGE_FIELDS = ("role", "content", "name")


class ModelNotFound(NotFound):
    """404 for a model that is not deployed, naming the field (OpenAI's param/code)."""
    param = "model"
    code = "model_not_found"


def parse_chat(body: bytes, content_type: str, path_model: str, models: Mapping[str, ModelConfig],
               request_id: str) -> Job:
    """POST /v1/chat/completions: messages rendered with the model's chat template."""
    data = _known_fields(json_object(body), CHAT_FIELDS)
    config = _model(data, models)
    if "messages" not in data:
        raise FieldError("'messages' is required: a list of {role, content} objects", "messages")
    messages = _messages(data["messages"])
    return _job(data, config, lambda sampling: GenerationRequest(request_id, sampling, messages=messages))


def parse_completion(body: bytes, content_type: str, path_model: str, models: Mapping[str, ModelConfig],
                     request_id: str) -> Job:
    """POST /v1/completions: a raw text prompt, no chat template."""
    data = _known_fields(json_object(body), COMPLETION_FIELDS)
    config = _model(data, models)
    if "prompt" not in data:
        raise FieldError("'prompt' is required: the text to continue", "prompt")
    prompt = check_prompt(_one_prompt(data["prompt"]))
    return _job(data, config, lambda sampling: GenerationRequest(request_id, sampling, prompt=prompt))


def _known_fields(data: dict, allowed: tuple[str, ...]) -> dict:
    """The fields to honour; null means "not given"; neutral ones must hold their neutral value."""
    out = {}
    for key, value in data.items():
        if value is None or key in IGNORED:
            continue
        if key in NEUTRAL:
            neutral = NEUTRAL[key]
            if value not in neutral or (isinstance(value, bool) and not any(isinstance(v, bool) for v in neutral)):
                ok = " or ".join(json.dumps(v) for v in neutral)
                raise FieldError(f"'{key}' is not supported by gridserve: only {ok} (no effect) is accepted",
                                 key, "unsupported_parameter")
            continue
        if key not in allowed:
            raise FieldError(f"unrecognized request argument {clip(key)!r} (supported: {', '.join(allowed)})",
                             key, "unknown_parameter")
        out[key] = value
    return out


def _model(data: dict, models: Mapping[str, ModelConfig]) -> ModelConfig:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise FieldError("'model' is required: the name of a deployed model (see GET /v1/models)", "model")
    try:
        return lookup_model(models, name)
    except NotFound as e:
        raise ModelNotFound(e.message) from None


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    """What OpenAI clients send, as (role, content) pairs: the developer role is system, content may be a
    list of text parts, `name` (and any null field) is ignored."""
    if not isinstance(value, list) or not value:
        raise FieldError(f"'messages' must be a non-empty list of {{role, content}} objects, got {kind(value)}",
                         "messages")
    pairs = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise FieldError(f"{where} must be an object with 'role' and 'content', got {kind(m)}", where)
        extra = sorted(k for k in set(m) - set(MESSAGE_FIELDS) if m[k] is not None)
        if extra:
            raise FieldError(f"{where}: unknown field {clip(extra[0])!r} (known: {', '.join(MESSAGE_FIELDS)})",
                             f"{where}.{extra[0]}")
        role = "system" if m.get("role") == "developer" else m.get("role")
        pairs.append((role, _text_parts(m.get("content"), where)))
    return check_messages(pairs)


def _text_parts(content: Any, where: str) -> Any:
    """Content as a list of parts: text parts are joined; any other kind is refused."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            what = part.get("type") if isinstance(part, dict) else kind(part)
            raise FieldError(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                             f"are supported, got {quote(what)}", f"{where}.content")
        texts.append(part["text"])
    return "".join(texts)


def _one_prompt(value: Any) -> Any:
    """A prompt string, or a list holding one; token-id prompts and several prompts are refused."""
    if not isinstance(value, list):
        return value
    if len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if value and all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in value):
        raise FieldError("token-id prompts are not supported: send the prompt as text", "prompt")
    raise FieldError("one prompt per request: send a string (or a list of one string)", "prompt")


def _job(data: dict, config: ModelConfig, request) -> Job:
    """The Job: `request` builds the GenerationRequest from the checked sampling fields."""
    n = data.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise FieldError(f"only n=1 is supported (one choice per request), got {quote(n)}; "
                         f"send several requests for several answers", "n", "unsupported_value")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise FieldError(f"'stream' must be true or false, got {quote(stream)}", "stream")
    include_usage = _stream_options(data, stream)
    if "max_completion_tokens" in data:
        if "max_tokens" in data and data["max_tokens"] != data["max_completion_tokens"]:
            raise FieldError("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        data["max_tokens"] = data.pop("max_completion_tokens")
    generate = request(Sampling.from_fields(data, config)).to_proto()
    return Job(config.name, generate, stream=stream, include_usage=include_usage)


def _stream_options(data: dict, stream: bool) -> bool:
    """Whether a streamed answer ends with a usage chunk."""
    options = data.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise FieldError("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(options, dict) or set(options) - set(STREAM_OPTIONS):
        raise FieldError(f"'stream_options' must be an object with {' and/or '.join(STREAM_OPTIONS)}, "
                         f"got {quote(options)}", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise FieldError("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    return include

