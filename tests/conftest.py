"""Session fixtures shared by every test layer: the tiny random-weight model and cluster helpers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests: few enough examples for `make test`; `pytest --hypothesis-profile=gridserve-long` runs more.
settings.register_profile("gridserve", max_examples=300, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("gridserve-long", settings.get_profile("gridserve"), max_examples=3000)
settings.load_profile("gridserve")

LAYERS = ("unit", "integration", "e2e")  # a test's marker is the folder it lives in, so `-m unit` works


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for layer in LAYERS:
            if layer in parts:
                item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight Llama with SmolLM2's tokenizer, built once per test session."""
    from support.tiny_model import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny model loaded in this process (context 256, at most 128 new tokens), for engine tests."""
    from gridserve.common.model_config import ModelConfig
    from gridserve.replica.model_loader import load_model

    cfg = ModelConfig.from_dict("tiny", {"source": {"type": "local", "path": str(tiny_model_dir)},
                                         "context_length": 256, "max_tokens_limit": 128,
                                         "sampling": {"max_new_tokens": 32}})
    return load_model(cfg)


@pytest.fixture(scope="session")
def tiny_configs(tmp_path_factory, tiny_model_dir) -> Path:
    """A model_configs.json offering the tiny model, a hub model and one that needs a GPU."""
    path = tmp_path_factory.mktemp("configs") / "model_configs.json"
    tiny = {
        "source": {"type": "local", "path": str(tiny_model_dir)},
        "context_length": 256,
        "max_tokens_limit": 128,
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 32},
        "resources": {"num_cpus": 1, "num_gpus": 0},
        "max_batch_size": 8,
        "max_waiting": 16,
    }
    configs = {
        "default_model": "tiny",
        "models": {
            "tiny": tiny,
            "tiny-gpu": {**tiny, "resources": {"num_cpus": 1, "num_gpus": 1}},
            "gpt2": {
                "source": {"type": "hub", "repo": "openai-community/gpt2"},
                "context_length": 1024,
                "max_tokens_limit": 256,
            },
        },
    }
    path.write_text(json.dumps(configs, indent=2))
    return path
