"""The two-minute soak (bench/soak.py): mixed load through the proxy with a kill -9 every 25 s of a replica,
the proxy, the head and a scheduler in turn; no request is lost and no process's open fds grow."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.waiting import free_port


BENCH = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.fixture
def soak_configs(tmp_path, tiny_configs):
    """The tiny model (real engine, torch) stands in for SmolLM2; the fake one carries the many streams."""
    configs = json.loads(Path(tiny_configs).read_text())
    configs["models"] = {"tiny": {**configs["models"]["tiny"], "resources": {"num_cpus": 1}},
                         "fake": {"source": {"type": "fake", "tokens_per_second": 20}, "context_length": 512,
                                  "max_tokens_limit": 128, "sampling": {"temperature": 0.0, "max_new_tokens": 40},
                                  "resources": {"num_cpus": 0.1}, "max_batch_size": 64, "max_waiting": 64}}
    path = tmp_path / "model_configs.json"
    path.write_text(json.dumps(configs))
    return path


def test_two_minute_soak_with_a_fault_every_25s_loses_no_request_and_leaks_no_fds(tmp_path, soak_configs):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--minutes", "2", "--fault-every", "25", "--real-model", "tiny",
         "--model-configs", str(soak_configs), "--real-streams", "4", "--fake-streams", "100",
         "--fake-replicas", "20", "--sim-nodes", "2", "--sample-every", "5", "--warmup", "20",
         "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--root", str(tmp_path / "soak"),
         "--out", str(out)], capture_output=True, text=True, timeout=480)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads((out / "soak.json").read_text())
    assert [f["kind"] for f in result["faults"]][:4] == ["replica", "proxy", "head", "scheduler"]
    assert not any("fault failed" in f["detail"] for f in result["faults"])
    assert result["real_ok"] > 0 and result["fake_ok"] > 100
    assert result["lost"] == 0, result["lost_examples"]
    # Open fds must stay flat in every process that lived long enough to judge. RSS and task counts are
    # reported (soak.json) but not asserted here: in two minutes a freshly restarted torch replica is still
    # warming its allocator and a server's tasks follow its streams in flight, which faults shake.
    grew = [c for c in result["series_grew"] if c["metric"] == "fds"]
    assert not grew, grew
    assert (out / "soak.png").exists()
