"""Autoscaling on a real cluster with the fake engine: a step load scales 0 -> 3 -> 0 with no failed request,
a steady load keeps a steady count for two minutes; deploy flags set the range, `scale` is refused, and the
settings survive a head restart."""
from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from support.cluster import READY, Cluster, chat, http
from support.waiting import free_port, wait_for

pytestmark = pytest.mark.timeout(300)

FAST = {
    "source": {"type": "fake", "tokens_per_second": 20},
    "context_length": 512, "max_tokens_limit": 128,
    "sampling": {"temperature": 0.0, "max_new_tokens": 60},
    "resources": {"num_cpus": 0.5},
    "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 1,
                    "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 1},
}


@pytest.fixture
def cluster(tmp_path):
    configs = tmp_path / "models.json"
    configs.write_text(json.dumps({"default_model": "fast", "models": {"fast": FAST}}))
    with Cluster(tmp_path, configs) as c:
        c.start_head(extra=["--grpc-port", str(free_port()), "--http-port", str(free_port())])
        c.start_scheduler("n1", num_cpus=4)
        yield c


def deployment(c: Cluster, model: str = "fast"):
    return next(d for d in c.status().deployments if d.model == model)


class StepLoad:
    """`streams` threads, each sending 3-second requests back to back until stopped; keeps every outcome."""

    def __init__(self, c: Cluster, streams: int):
        self.c, self.results, self.stop = c, [], threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(streams)]

    def _loop(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            status, _, text = chat(self.c, "fast", {"messages": [{"role": "user", "content": "go"}]}, timeout=90)
            self.results.append((status, time.monotonic() - t0, text[:200]))

    def __enter__(self) -> "StepLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def test_a_step_load_scales_from_zero_to_max_and_back_to_zero_without_failures(cluster):
    c = cluster
    assert "deployed fast with 0 replica(s) (autoscaled: 0..3)" in c.cli("deploy", "fast").stdout
    status, _, body = http("GET", c.url("/ready"))
    assert status == 200 and json.loads(b"".join(body))["scaled_to_zero"] == ["fast"]
    t0 = time.monotonic()
    with StepLoad(c, streams=3) as load:
        wait_for(lambda: load.results, 90, "the first request, served from zero")
        first_s = time.monotonic() - t0
        wait_for(lambda: (lambda d: d.replicas == 3 and d.ready == 3)(deployment(c)), 90, "3 READY replicas")
        up_s = time.monotonic() - t0
        done = len(load.results)
        wait_for(lambda: len(load.results) >= done + 3, 60, "requests on 3 replicas")
    failures = [r for r in load.results if r[0] != 200]
    assert failures == [] and len(load.results) >= 6
    t1 = time.monotonic()
    wait_for(lambda: deployment(c).replicas == 0 and not c.replicas("fast"), 60, "scale back to zero")
    print(f"\nfirst answer from zero {first_s:.1f}s, 3 replicas ready {up_s:.1f}s after the load started, "
          f"back at zero {time.monotonic() - t1:.1f}s after it stopped; {len(load.results)} requests")
    data = json.loads(c.cli("status", "--output", "json").stdout)
    scaling = next(d for d in data["deployments"] if d["model"] == "fast")["autoscaling"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (0, 3)
    assert " -> 0: load 0.0 needs only 0 x 1 ongoing requests for 4s" in scaling["last_decision"]
    text = c.cli("status").stdout
    assert "AUTOSCALING" in text and "LAST DECISION" in text


def test_a_steady_load_keeps_a_steady_count_for_two_minutes_with_no_scale_decision(cluster):
    c = cluster
    c.cli("deploy", "fast", "--min-replicas", "1", "--max-replicas", "4", "--target-ongoing-requests", "2",
          "--upscale-delay", "2", "--downscale-delay", "10", "--look-back-period", "5")
    c.wait_ready("fast", 1)
    with StepLoad(c, streams=3) as load:  # 3 requests open at all times, 2 per replica: 2 replicas wanted
        wait_for(lambda: (lambda d: d.replicas == 2 and d.ready == 2)(deployment(c)), 90, "2 READY replicas")
        time.sleep(6)  # a look-back period: from here the averaged load is the steady one alone
        decided = deployment(c).autoscaling.last_decision_at
        ids = {r.replica_id for r in c.replicas("fast")}
        served, samples, end = len(load.results), [], time.monotonic() + 120
        while time.monotonic() < end:
            d = deployment(c)
            samples.append((d.replicas, d.ready, d.autoscaling.last_decision_at,
                            frozenset(r.replica_id for r in c.replicas("fast")), d.autoscaling.load))
            time.sleep(1)
    assert [r for r in load.results if r[0] != 200] == [] and len(load.results) - served >= 60
    assert {s[:2] for s in samples} == {(2, 2)} and len(samples) >= 100  # target and READY count never moved
    assert {s[2] for s in samples} == {decided}  # no scale decision at all, not even one undone at once
    assert {s[3] for s in samples} == {frozenset(ids)}  # the same two replicas throughout
    assert 2 < sum(s[4] for s in samples) / len(samples) <= 3  # the load the head saw: steady near 3


def test_deploy_flags_set_the_range_scale_is_refused_and_settings_survive_a_head_restart(cluster):
    c = cluster
    out = c.cli("deploy", "fast", "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "4",
                "--downscale-delay", "7").stdout
    assert "(autoscaled: 1..2)" in out
    c.wait_ready("fast", 1)
    res = c.cli("scale", "fast", "2", check=False)
    assert res.returncode != 0 and "fast is autoscaled (1..2 replicas)" in res.stderr
    bad = c.cli("deploy", "fast", "--min-replicas", "3", "--max-replicas", "2", check=False)
    assert bad.returncode != 0 and "max_replicas" in bad.stderr
    both = c.cli("deploy", "fast", "--replicas", "2", "--max-replicas", "2", check=False)
    assert both.returncode == 1 and "--replicas (a fixed count) or autoscaling flags, not both" in both.stderr
    c.kill("head", signal.SIGKILL)
    c.relaunch_head()
    d = wait_for(lambda: (lambda d: d if d.ready == 1 else None)(deployment(c)), 60, "the adopted replica")
    config = json.loads(d.autoscaling.config_json)
    assert (d.replicas, d.autoscaling.min_replicas, d.autoscaling.max_replicas) == (1, 1, 2)
    assert (config["target_ongoing_requests"], config["downscale_delay_s"], config["upscale_delay_s"]) == (4, 7, 1)
    c.wait_reconcile_passes(3)
    assert [r.state for r in c.replicas("fast")] == [READY]
    assert "fast: replicas 1 -> 2" in c.cli("deploy", "fast", "--replicas", "2").stdout  # fixed from now on
    assert not deployment(c).HasField("autoscaling")
    assert "fast: replicas 2 -> 3" in c.cli("scale", "fast", "3").stdout
