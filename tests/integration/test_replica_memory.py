"""Memory, seen and enforced, in a real cluster with the tiny model: status shows each replica's RSS and limit
and each node's free memory; a replica made to allocate (SIGUSR2 under fault injection) past its limit is
restarted with the reason; placement refuses a replica no node has the memory for."""
import json
import os
import signal

import pytest

from support.cluster import Cluster
from support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)

LIMIT_MIB = 640  # the tiny replica holds about 430 MiB; one SIGUSR2 adds 256 MiB


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_configs):
    root = tmp_path_factory.mktemp("memory-cluster")
    configs = json.loads(tiny_configs.read_text())
    tiny = configs["models"]["tiny"]
    configs["models"]["tiny-capped"] = {**tiny, "resources": {"num_cpus": 1, "memory": f"{LIMIT_MIB}MiB"}}
    configs["models"]["tiny-huge"] = {**tiny, "resources": {"num_cpus": 1, "memory": "100TiB"}}
    path = root / "model_configs.json"
    path.write_text(json.dumps(configs))
    with Cluster(root, path, env={"GRIDSERVE_FAULT_INJECTION": "1"}) as c:
        c.start_head()
        c.start_scheduler("n1", num_cpus=4)
        yield c


def test_status_shows_each_replicas_memory_and_limit_and_each_nodes_free_memory(cluster):
    cluster.cli("deploy", "tiny-capped")
    cluster.wait_ready("tiny-capped", 1)
    r = wait_for(lambda: next((r for r in cluster.replicas("tiny-capped") if r.rss_bytes), None), 10, "an RSS")
    assert 50 << 20 < r.rss_bytes < LIMIT_MIB << 20 and r.memory_limit_bytes == LIMIT_MIB << 20
    assert r.gpu_bytes == 0
    node = cluster.status().nodes[0]
    assert 0 < node.available.memory_bytes <= node.capacity.memory_bytes
    row = next(line for line in cluster.cli("replicas").stdout.splitlines() if line.startswith(r.replica_id))
    assert f"MiB/{LIMIT_MIB}.0MiB" in row


def test_a_replica_that_grows_past_its_memory_limit_is_restarted_with_the_reason(cluster):
    r = cluster.wait_ready("tiny-capped", 1)[0]

    def restarted():
        now = cluster.replicas("tiny-capped")[0]
        if now.restarts == 0 and now.pid == r.pid:
            os.kill(r.pid, signal.SIGUSR2)  # another 256 MiB
            return None
        return now
    now = wait_for(restarted, 30, "the scheduler to stop the replica", interval=1.5)
    assert now.restarts == 1 and now.last_restart.startswith(f"killed by SIGKILL: over its memory limit ({LIMIT_MIB} "
                                                             f"MiB): RSS ")
    again = cluster.wait_ready("tiny-capped", 1)[0]
    assert again.pid != r.pid and again.restarts == 1
    row = next(line for line in cluster.cli("replicas").stdout.splitlines() if line.startswith(r.replica_id))
    assert f"last restart: killed by SIGKILL: over its memory limit ({LIMIT_MIB} MiB)" in row


def test_placement_refuses_a_replica_no_node_has_the_memory_for(cluster):
    cluster.cli("deploy", "tiny-huge")
    message = wait_for(lambda: next((d.message for d in cluster.status().deployments
                                     if d.model == "tiny-huge" and d.message), None), 10, "a pending message")
    assert message == "1 replica(s) pending: no alive node has 1 free CPU and 104857600 MiB free memory"
    assert not cluster.replicas("tiny-huge")
    assert "104857600 MiB free memory" in cluster.cli("deployments").stdout
