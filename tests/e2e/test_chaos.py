"""Chaos with the real SmolLM2: each single-process failure of the reliability issue happens while
concurrent greedy streams (native text and OpenAI SSE) run through the cluster. Every case counts the
client requests that failed (zero, except the streams a killed proxy was carrying) and checks that every
completed text equals the no-failure text of its prompt, so nothing was repeated or lost."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from support.cluster import READY, Cluster, http, pid_alive
from support.waiting import free_port, wait_for
from gridserve.common.model_config import DEFAULT_MODEL_CONFIGS
from support.streamload import PROMPTS, StreamLoad, WatchedStream, reference_texts

pytestmark = pytest.mark.timeout(900)

MODEL = "smollm2"
MAX_TOKENS = 40
STALL_TIMEOUT_S = 3.0
# fast detection for a test: probes every 0.5 s, 1 s to answer, 2 s of bad health before the kill
# Two schedulers share this machine's two cores: one torch thread per replica, or 2 x 2 threads on 2 cores
# stall each other far past the stall timeout.
SCHEDULER_FLAGS = ["--probe-interval", "0.5", "--probe-timeout", "1", "--unhealthy-grace", "2",
                   "--drain-grace", "60", "--threads-per-replica", "1"]
HEAD_FLAGS = ["--node-timeout", "4"]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """The shipped SmolLM2 entry with a short engine stall timeout and greedy defaults."""
    shipped = json.loads(DEFAULT_MODEL_CONFIGS.read_text())
    entry = {**shipped["models"][MODEL], "stall_timeout_s": STALL_TIMEOUT_S, "max_batch_size": 8}
    path = tmp_path_factory.mktemp("chaos-configs") / "model_configs.json"
    path.write_text(json.dumps({"default_model": MODEL, "models": {MODEL: entry}}))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, configs):
    """A head (fixed ports, so a restarted one comes back where clients look) and two nodes, each running
    one SmolLM2 replica; replicas honour SIGUSR1 as an injected engine hang."""
    c = Cluster(tmp_path_factory.mktemp("chaos"), configs, env={"GRIDSERVE_FAULT_INJECTION": "1"})
    with c:
        c.start_head(["--grpc-port", str(free_port()), "--http-port", str(free_port()), *HEAD_FLAGS])
        for node in ("n1", "n2"):
            c.start_scheduler(node, num_cpus=2, extra=SCHEDULER_FLAGS)
        c.cli("deploy", MODEL, "--replicas", "2")
        settled(c)
        c.reference = reference_texts(c, MODEL, MAX_TOKENS)
        yield c


def settled(c: Cluster, gone: int = 0) -> dict[str, int]:
    """Waits for two READY replicas that the proxy routes to, none of them the process `gone`;
    returns replica id -> pid."""
    def ready():
        reps = {r.replica_id: r.pid for r in c.replicas(MODEL, READY)}
        status, _, body = http("GET", c.url("/ready"), timeout=5)
        routed = status == 200 and json.loads(b"".join(body))["models"].get(MODEL) == 2
        return reps if len(reps) == 2 and gone not in reps.values() and routed else None
    return wait_for(ready, 240, "two READY replicas in the routes")


def assert_whole(c: Cluster, load: StreamLoad, allowed_failures=()) -> None:
    """Every request that ended normally carries exactly its prompt's no-failure text."""
    failed = [o for o in load.failures() if o not in allowed_failures]
    assert failed == [], f"{len(failed)} of {len(load.results)} requests failed: {failed[:3]}"
    wrong = [o for o in load.results if o.ok and o.text != c.reference[o.prompt]]
    assert wrong == [], "\n".join(f"{o.client} {o.prompt!r}:\n got  {o.text!r}\n want {c.reference[o.prompt]!r}"
                                  for o in wrong[:3])


def failovers(c: Cluster) -> float:
    """Mid-stream failovers the proxy made (resumed on another replica), from its /metrics."""
    return c.metric("gridserve_failovers_total", outcome="resumed")


def streaming_on(c: Cluster, load: StreamLoad, *replica_pids: int) -> None:
    """Waits until the load is under way (a few requests done, streams open on every replica)."""
    load.wait(len(load.results) + 3)
    assert all(pid_alive(pid) for pid in replica_pids)
    time.sleep(1.0)  # into the next streams: they are mid-way when the failure comes


def report(case: str, load: StreamLoad, **numbers) -> None:
    slowest = max(o.ended - o.started for o in load.results)
    extra = " ".join(f"{k}={v}" for k, v in numbers.items())
    print(f"\n[chaos] {case}: {len(load.results)} requests, {len(load.failures())} failed, "
          f"slowest {slowest:.1f}s {extra}")


def test_replica_kill_mid_stream_fails_over_and_the_replica_is_restarted(cluster):
    """The replica killed is the one a watched stream is known to be mid-way on: that stream moves to the
    other replica and ends whole, as do the streams of the load around it."""
    c = cluster
    before = settled(c)
    resumed = failovers(c)
    with StreamLoad(c, MODEL, MAX_TOKENS) as load:
        streaming_on(c, load, *before.values())
        watched = WatchedStream(c, MODEL, PROMPTS[0], MAX_TOKENS)
        victim = watched.replica
        pid = before[victim]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        back = settled(c, gone=pid)
        restart_s = time.monotonic() - t0
        load.wait(len(load.results) + 4)
        ok, text, error = watched.finish()
    assert (ok, error) == (True, "") and text == c.reference[PROMPTS[0]], "the stream cut off mid-way ends whole"
    assert back.get(victim) not in (None, pid), "the same replica id came back with a new process"
    assert [r.restarts for r in c.replicas(MODEL) if r.replica_id == victim] == [1]
    assert failovers(c) > resumed, "the watched stream (and any other on the killed replica) moved to the other one"
    report("replica kill -9", load, failovers=failovers(c) - resumed, restarted_s=f"{restart_s:.1f}")
    assert_whole(c, load)


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGUSR1"], ids=["process-frozen", "engine-wedged"])
def test_hung_replica_is_replaced_and_its_streams_continue_elsewhere(cluster, fault):
    """SIGSTOP freezes the whole process (gRPC stops answering); SIGUSR1 (fault injection) wedges only the
    engine thread while gRPC and health keep answering. Both are detected, killed and replaced."""
    c = cluster
    before = settled(c)
    victim, pid = sorted(before.items())[-1]
    resumed = failovers(c)
    with StreamLoad(c, MODEL, MAX_TOKENS) as load:
        streaming_on(c, load, pid)
        os.kill(pid, getattr(signal, fault))
        t0 = time.monotonic()
        wait_for(lambda: not pid_alive(pid), 60, f"the scheduler to kill the hung replica ({fault})")
        killed_s = time.monotonic() - t0
        back = settled(c, gone=pid)
        load.wait(len(load.results) + 4)
    assert back.get(victim) not in (None, pid)
    report(f"hung replica ({fault})", load, failovers=failovers(c) - resumed, killed_after_s=f"{killed_s:.1f}")
    assert_whole(c, load)


def test_proxy_kill_loses_only_its_open_streams_and_comes_back_on_the_same_port(cluster):
    """The streams the proxy carried end with a closed connection at once; connections tried while it is
    down are refused; everything sent once it is back works."""
    c = cluster
    settled(c)
    proxy = c.status().proxy_pid
    with StreamLoad(c, MODEL, MAX_TOKENS) as load:
        load.wait(len(load.results) + 3)
        os.kill(proxy, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: http("GET", c.url("/health"), timeout=2)[0] == 200, 30, "the proxy back")
        back_at = time.monotonic()
        load.wait(len(load.results) + 6)
    assert c.status().proxy_pid not in (0, proxy) and c.status().proxy_restarts >= 1
    cut = [o for o in load.failures() if o.started < killed_at]
    refused = [o for o in load.failures() if killed_at <= o.started < back_at]
    report("proxy kill -9", load, cut_streams=len(cut), refused_while_down=len(refused),
           down_s=f"{back_at - killed_at:.2f}")
    assert len(cut) <= load.streams
    assert all(o.ended - killed_at < 5 for o in cut), "a cut stream ends at once, it does not hang"
    assert not [o for o in load.failures() if o.started >= back_at], "requests after the restart all work"
    assert_whole(c, load, allowed_failures=cut + refused)


def test_head_kill_loses_nothing_and_a_restarted_head_adopts_the_replicas(cluster):
    c = cluster
    before = settled(c)
    with StreamLoad(c, MODEL, MAX_TOKENS) as load:
        load.wait(len(load.results) + 3)
        c.kill("head")
        load.wait(len(load.results) + 4)  # served with no head at all
        c.relaunch_head()
        t0 = time.monotonic()
        wait_for(lambda: {r.replica_id: r.pid for r in c.replicas(MODEL, READY)} == before, 60,
                 "the restarted head to adopt the same replica processes")
        adopted_s = time.monotonic() - t0
        load.wait(len(load.results) + 3)
    report("head kill -9", load, adopted_after_s=f"{adopted_s:.1f}")
    assert_whole(c, load)


def test_node_loss_replaces_its_replica_and_a_returning_node_adds_no_duplicate(cluster):
    """kill -9 of a node's scheduler: its replica is stopped with it (SIGTERM from the kernel), the head
    marks the node dead after --node-timeout and places a replacement on the other node."""
    c = cluster
    before = settled(c)
    lost = {r.replica_id for r in c.replicas(MODEL) if r.node_id == "n1"}
    resumed = failovers(c)
    with StreamLoad(c, MODEL, MAX_TOKENS) as load:
        load.wait(len(load.results) + 3)
        c.kill("scheduler-n1")
        t0 = time.monotonic()
        wait_for(lambda: not any(n.alive for n in c.status().nodes if n.node_id == "n1"), 30, "n1 marked dead")
        dead_s = time.monotonic() - t0
        after = settled(c)
        replaced_s = time.monotonic() - t0
        load.wait(len(load.results) + 4)
    assert lost and not lost & set(after) and set(before) - lost < set(after)
    assert {r.node_id for r in c.replicas(MODEL)} == {"n2"}
    c.start_scheduler("n1", num_cpus=2, extra=SCHEDULER_FLAGS)
    c.wait_reconcile_passes(3)
    assert len(c.replicas(MODEL)) == 2, "the returning node does not get a duplicate replica"
    report("node loss (scheduler kill -9)", load, dead_after_s=f"{dead_s:.1f}",
           replaced_after_s=f"{replaced_s:.1f}", failovers=failovers(c) - resumed)
    assert_whole(c, load)


def test_scale_down_drains_streams_before_stopping_a_replica(cluster):
    c = cluster
    settled(c)
    with StreamLoad(c, MODEL, MAX_TOKENS) as load:
        load.wait(len(load.results) + 3)
        c.cli("scale", MODEL, "1")
        wait_for(lambda: len(c.replicas(MODEL)) == 1, 90, "the drained replica to be gone")
        load.wait(len(load.results) + 4)
    report("scale 2 -> 1 under load", load)
    assert_whole(c, load)
    c.cli("scale", MODEL, "2")
    settled(c)
