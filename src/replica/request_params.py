"""Where a GenerateRequest enters the replica: checked by the common request contract (the same rules the
proxy applied), then resolved against the model's config into what the engine takes."""
from __future__ import annotations

from gridserve.common.model_config import ModelConfig
from gridserve.common.request_contract import GenerationRequest, SamplingOptions


def resolve_request(request, model: ModelConfig) -> tuple[str, str | list[tuple[str, str]], SamplingOptions]:
    """("prompt", text) or ("chat", [(role, content), ...]) and the resolved sampling options of a
    GenerateRequest; FieldError (INVALID_ARGUMENT naming the field) when it is malformed."""
    checked = GenerationRequest.from_proto(request, model)
    opts = checked.sampling.resolve(model)
    if checked.messages is not None:
        return "chat", list(checked.messages), opts
    return "prompt", checked.prompt, opts
