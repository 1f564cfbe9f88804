"""ModelConfig to and from its wire form (the gridserve.v1.ModelConfig message, or base64 of it on argv),
validated on the way in by the same rules as model_configs.json."""
from __future__ import annotations

import base64
import binascii
import dataclasses

from google.protobuf.message import DecodeError

from gridserve.common.errors import ConfigError
from gridserve.common.model_config import NO_EMBEDDING_FIELDS, ModelConfig
from gridserve.v1 import model_config_pb2

SOURCE_FIELDS = ("type", "package", "file", "repo", "revision", "path", "tokens_per_second", "prefill_delay_s")


def config_to_proto(config: ModelConfig) -> model_config_pb2.ModelConfig:
    s, r = config.sampling, config.resources
    msg = model_config_pb2.ModelConfig(
        name=config.name,
        source=model_config_pb2.ModelSource(**{k: getattr(config.source, k) for k in SOURCE_FIELDS}),
        context_length=config.context_length, max_tokens_limit=config.max_tokens_limit,
        sampling=model_config_pb2.SamplingDefaults(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                                   max_new_tokens=s.max_new_tokens),
        resources=model_config_pb2.ModelResources(num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                                                  memory_mb=r.memory_mb),
        dtype=config.dtype, max_batch_size=config.max_batch_size, max_waiting=config.max_waiting,
        description=config.description, stall_timeout_s=config.stall_timeout_s,
        quantization=config.quantization, task=config.task)
    if config.autoscaling is not None:
        msg.autoscaling.CopyFrom(model_config_pb2.Autoscaling(**dataclasses.asdict(config.autoscaling)))
    return msg


def config_to_dict(msg: model_config_pb2.ModelConfig) -> dict:
    """The message as a model_configs.json entry (every field given; empty source fields, and an embedding
    model's generation settings, left out)."""
    s, r = msg.sampling, msg.resources
    d = {
        "source": {k: getattr(msg.source, k) for k in SOURCE_FIELDS if getattr(msg.source, k)},
        "context_length": msg.context_length, "max_tokens_limit": msg.max_tokens_limit,
        "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                     "max_new_tokens": s.max_new_tokens},
        "resources": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "memory_mb": r.memory_mb},
        "dtype": msg.dtype, "max_batch_size": msg.max_batch_size, "max_waiting": msg.max_waiting,
        "description": msg.description, "stall_timeout_s": msg.stall_timeout_s,
        "quantization": msg.quantization or "none",
        "task": msg.task or "generate",
    }
    if d["task"] == "embedding":
        for key in NO_EMBEDDING_FIELDS:
            d.pop(key)
    if msg.HasField("autoscaling"):
        a = msg.autoscaling
        d["autoscaling"] = {f.name: getattr(a, f.name) for f in a.DESCRIPTOR.fields
                            if f.name != "initial_replicas" or a.HasField("initial_replicas")}
    return d


def config_from_proto(msg: model_config_pb2.ModelConfig) -> ModelConfig:
    """A validated ModelConfig, or ConfigError naming the field (as for model_configs.json)."""
    if not msg.name:
        raise ConfigError("model config: 'name' is empty")
    return ModelConfig.from_dict(msg.name, config_to_dict(msg), where=f"model config {msg.name!r}")


def config_to_arg(config: ModelConfig) -> str:
    """Base64 of the serialized message: one argv word, no quoting, no file to write or clean up."""
    return base64.b64encode(config_to_proto(config).SerializeToString()).decode("ascii")


def config_from_arg(text: str) -> ModelConfig:
    try:
        msg = model_config_pb2.ModelConfig.FromString(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError, DecodeError) as e:
        raise ConfigError(f"--model-config: not base64 of a gridserve.v1.ModelConfig message ({e})") from None
    return config_from_proto(msg)
