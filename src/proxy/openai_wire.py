"""The OpenAI wire format: chat.completions and completions answers (SSE chunks or one JSON object),
the model list, and errors as {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import json
import time

from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.openai_parse import parse_chat, parse_completion
from gridserve.proxy.relay import Job, Result, Wire
from gridserve.proxy.route_cache import ModelRoute

DONE = b"data: [DONE]\n\n"
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings")


def is_openai_path(path: str) -> bool:
    return path in PATHS or path.startswith("/v1/models/")


def error_body(err: HttpError) -> dict:
    return {"error": {"message": err.message, "type": err.error_type, "param": err.param, "code": err.code}}


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class _OpenAIAnswer:
    """What chat and text completions share: ids, the SSE framing, the usage chunk, [DONE], errors."""
    media_type = "text/event-stream"
    prefix = ""         # of the id: chatcmpl / cmpl
    chunk_object = ""   # the streamed chunks' "object"
    whole_object = ""   # the non-streaming answer's "object"

    def __init__(self, job: Job, request_id: str):
        self.id = f"{self.prefix}-{request_id}"
        self.model = job.model
        self.include_usage = job.include_usage
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}  # no system_fingerprint: gridserve has none to give (absent, not null)

    def _chunk(self, choice: dict) -> bytes:
        data = self._envelope(self.chunk_object, [{"index": 0, **choice, "logprobs": None}])
        if self.include_usage:
            data["usage"] = None  # as OpenAI: only the last chunk carries usage
        return _sse(data)

    def tail(self, result: Result) -> bytes:
        out = self._chunk(self._final_choice(result.finish.value))
        if self.include_usage:
            out += _sse({**self._envelope(self.chunk_object, []), "usage": _usage(result)})
        return out + DONE

    def failure(self, err: HttpError) -> bytes:
        return _sse(error_body(err)) + DONE

    def whole(self, text: str, result: Result) -> dict:
        choice = {"index": 0, **self._whole_choice(text), "logprobs": None, "finish_reason": result.finish.value}
        return {**self._envelope(self.whole_object, [choice]), "usage": _usage(result)}

    def _final_choice(self, finish: str) -> dict:
        raise NotImplementedError

    def _whole_choice(self, text: str) -> dict:
        raise NotImplementedError


class ChatAnswer(_OpenAIAnswer):
    prefix, chunk_object, whole_object = "chatcmpl", "chat.completion.chunk", "chat.completion"

    def head(self) -> bytes:
        return self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def delta(self, text: str) -> bytes:
        return self._chunk({"delta": {"content": text}, "finish_reason": None})

    def _final_choice(self, finish: str) -> dict:
        return {"delta": {}, "finish_reason": finish}

    def _whole_choice(self, text: str) -> dict:
        return {"message": {"role": "assistant", "content": text, "refusal": None}}


class CompletionAnswer(_OpenAIAnswer):
    prefix, chunk_object, whole_object = "cmpl", "text_completion", "text_completion"

    def head(self) -> bytes:
        return b""

    def delta(self, text: str) -> bytes:
        return self._chunk({"text": text, "finish_reason": None})

    def _final_choice(self, finish: str) -> dict:
        return {"text": "", "finish_reason": finish}

    def _whole_choice(self, text: str) -> dict:
        return {"text": text}


CHAT = Wire(api="chat.completions", parse=parse_chat, answer=ChatAnswer, error_body=error_body)
COMPLETIONS = Wire(api="completions", parse=parse_completion, answer=CompletionAnswer, error_body=error_body)


def model_object(name: str, route: ModelRoute) -> dict:
    """One deployed model as OpenAI lists it, plus what gridserve knows of it."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "gridserve",
            "ready_replicas": len(route.endpoints), "context_length": route.config.context_length,
            "max_tokens_limit": route.config.max_tokens_limit, "description": route.config.description,
            "task": route.config.task}
