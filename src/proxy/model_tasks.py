"""Which endpoints serve which model task: a chat or completions request to an embedding model is a 400, and the reverse."""
from __future__ import annotations

from gridserve.common.model_config import ModelConfig
from gridserve.proxy.http_errors import HttpError

ENDPOINTS = {"generate": "POST /v1/chat/completions, /v1/completions or /v1/chat/{model}",
             "embedding": "POST /v1/embeddings"}
WHAT = {"generate": "a text-generation model", "embedding": "an embedding model"}


def check_task(config: ModelConfig, wanted: str) -> None:
    """HttpError 400 (param "model") unless the model's task is the one this endpoint serves."""
    if config.task != wanted:
        raise HttpError(400, "invalid_request_error",
                        f"model {config.name!r} is {WHAT.get(config.task, config.task)}: send it to "
                        f"{ENDPOINTS.get(config.task, 'its own endpoint')}, or pick {WHAT[wanted]} here "
                        f"(see GET /v1/models, field 'task')", param="model", code="wrong_model_task")
