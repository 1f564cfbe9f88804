"""`gridserve simulate` against a real head and proxy: 50 simulated nodes, 200 fake-engine replicas that a
real proxy streams from, a status that summarises, and a head killed with SIGKILL that re-adopts them all."""
from __future__ import annotations

import json
import time

import pytest

from support.cluster import READY, Cluster, chat
from support.waiting import free_port, wait_for


NODES, REPLICAS = 50, 200


@pytest.fixture(scope="module")
def fake_configs(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "model_configs.json"
    path.write_text(json.dumps({"default_model": "fake", "models": {
        "fake": {"source": {"type": "fake", "tokens_per_second": 200}, "context_length": 512,
                 "max_tokens_limit": 128, "sampling": {"temperature": 0.0, "max_new_tokens": 16},
                 "resources": {"num_cpus": 0.1}},
        "tiny-real": {"source": {"type": "local", "path": "/nonexistent"}, "context_length": 64,
                      "max_tokens_limit": 32, "sampling": {"max_new_tokens": 16}, "resources": {"num_cpus": 0.1}}}}))
    return path


def ready_ids(c: Cluster) -> set[str]:
    return {r.replica_id for r in c.status().replicas if r.state == READY}


def test_simulated_nodes_serve_fake_replicas_that_survive_a_head_kill(tmp_path, fake_configs):
    c = Cluster(tmp_path, fake_configs)
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--max-replicas", str(REPLICAS)]
    try:
        c.start_head(extra=ports)
        c._spawn("simulate", ["simulate", "--head", c.grpc_address, "--nodes", str(NODES), "--cpus-per-node", "1",
                              "--cluster-token-file", str(c.token_file)])
        wait_for(lambda: sum(n.alive for n in c.status().nodes) == NODES, 60, f"{NODES} simulated nodes")
        c.cli("deploy", "fake", "--replicas", str(REPLICAS))
        before = wait_for(lambda: len(ids := ready_ids(c)) == REPLICAS and ids, 120, f"{REPLICAS} READY")
        assert len({r.node_id for r in c.status().replicas}) == NODES  # spread over every node

        # a real proxy streams from the in-process fake engines, on their real ports
        status, _, text = chat(c, "fake", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert status == 200 and len(text.split()) == 8

        # the table summarises instead of listing 200 replicas; JSON lists them all
        table = c.cli("status").stdout
        assert "200 replicas" in table and "fake   READY  200" in table and len(table.splitlines()) < 30
        listed = json.loads(c.cli("status", "--output", "json").stdout)["replicas"]
        assert {r["replica_id"] for r in listed} == before

        # a model that is not fake cannot run on a simulated node: FAILED, with why
        c.cli("deploy", "tiny-real", "--replicas", "1")
        failed = wait_for(lambda: [r for r in c.status().replicas if r.model == "tiny-real" and r.message], 30,
                          "the non-fake replica to fail")
        assert "only fake-engine models" in failed[0].message
        c.cli("undeploy", "tiny-real")

        c.kill("head")  # SIGKILL
        t0 = time.monotonic()
        c.relaunch_head()
        wait_for(lambda: sum(n.alive for n in c.status().nodes) == NODES and ready_ids(c) == before, 60,
                 "every node re-adopted with the same replicas")
        st = c.status()
        assert len(st.replicas) == REPLICAS  # none duplicated, none lost
        print(f"\nsimulated {NODES} nodes / {REPLICAS} replicas re-adopted {time.monotonic() - t0:.1f}s after "
              f"the head's restart")
    finally:
        c.stop()
