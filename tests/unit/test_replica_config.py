"""Replica settings: fault injection is off unless GRIDSERVE_FAULT_INJECTION=1 is set when the config is built."""
from __future__ import annotations

import pytest

from gridserve.common.errors import ConfigError
from gridserve.common.model_config import ModelConfig
from gridserve.common.model_config_proto import config_to_arg
from gridserve.replica.settings import parse_config

MODEL = config_to_arg(ModelConfig.from_dict("m", {"source": {"type": "local", "path": "/models/m"},
                                                   "context_length": 64, "max_tokens_limit": 32,
                                                   "sampling": {"max_new_tokens": 16}, "stall_timeout_s": 2.5}))
ARGV = ["--replica-id", "m-abc123", "--model-config", MODEL]


@pytest.mark.parametrize("value,on", [(None, False), ("", False), ("0", False), ("1", True)])
def test_fault_injection_follows_the_environment_at_parse_time(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("GRIDSERVE_FAULT_INJECTION", raising=False)
    else:
        monkeypatch.setenv("GRIDSERVE_FAULT_INJECTION", value)
    cfg = parse_config(ARGV)
    assert cfg.fault_injection is on and cfg.model.stall_timeout_s == 2.5


def test_an_unclear_fault_injection_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("GRIDSERVE_FAULT_INJECTION", "yes")
    with pytest.raises(ConfigError, match="GRIDSERVE_FAULT_INJECTION: must be 1 .* got 'yes'"):
        parse_config(ARGV)
