"""resources.memory in operator units ("1.2GiB", "1200MB", "512Mi", a bare number of MiB) beside memory_mb."""
import pytest

from gridserve.common.errors import ConfigError
from gridserve.common.model_config import ModelConfig, parse_memory_mb

BASE = {"source": {"type": "local", "path": "/x"}, "context_length": 64, "max_tokens_limit": 32,
        "sampling": {"max_new_tokens": 16}}


@pytest.mark.parametrize("value, mib", [("1.2GiB", 1229), ("1200MB", 1145), ("1200MiB", 1200), ("512Mi", 512),
                                        ("2 GB", 1908), ("1G", 1024), ("0.5TiB", 524288), (900, 900), ("900", 900),
                                        ("4096KiB", 4), ("1b", 1)])
def test_memory_sizes_in_operator_units_become_whole_mib_rounded_up(value, mib):
    assert parse_memory_mb(value, "x") == mib


def test_memory_in_a_model_entry_sets_memory_mb_and_survives_a_round_trip():
    cfg = ModelConfig.from_dict("m", {**BASE, "resources": {"memory": "1.5GiB"}})
    assert cfg.resources.memory_mb == 1536
    assert ModelConfig.from_json(cfg.to_json()).resources.memory_mb == 1536


@pytest.mark.parametrize("value", ["lots", "-1GB", "1.2XB", "", "GiB", True, None, [1]])
def test_a_bad_memory_size_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"models\.m\.resources\.memory: must be a size such as \"1200MiB\""):
        ModelConfig.from_dict("m", {**BASE, "resources": {"memory": value}})


def test_memory_and_memory_mb_together_are_refused():
    with pytest.raises(ConfigError, match="give either memory or memory_mb, not both"):
        ModelConfig.from_dict("m", {**BASE, "resources": {"memory": "1GiB", "memory_mb": 1024}})
