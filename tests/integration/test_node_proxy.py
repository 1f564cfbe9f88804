"""A proxy on a node: the scheduler runs one beside it (--proxy-port), restarts it when it dies, stops it on
exit; clients can use it like the head's, and the head's autoscaling sums the load of both proxies."""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from support.cluster import Cluster, http, pid_alive
from support.waiting import free_port, wait_for

pytestmark = pytest.mark.timeout(240)

FAST = {"source": {"type": "fake", "tokens_per_second": 20}, "context_length": 512, "max_tokens_limit": 128,
        "sampling": {"temperature": 0.0, "max_new_tokens": 120}, "resources": {"num_cpus": 0.5},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1, "upscale_delay_s": 600}}


def ask(url: str) -> int:
    """The status of one chat request; 0 when nothing listens (a proxy restarting)."""
    try:
        return http("POST", f"{url}/v1/chat/fast", "go", {"Content-Type": "text/plain"}, timeout=60)[0]
    except ConnectionError:
        return 0


def test_a_node_proxy_serves_restarts_and_its_load_counts_for_autoscaling(tmp_path):
    configs = tmp_path / "models.json"
    configs.write_text(json.dumps({"default_model": "fast", "models": {"fast": FAST}}))
    with Cluster(tmp_path, configs) as c:
        c.start_head()
        port = free_port()
        c.start_scheduler("n1", num_cpus=4, extra=["--proxy-port", str(port)])
        node_url = f"http://127.0.0.1:{port}"
        pid_file = tmp_path / "n1" / "run" / "proxy.pid"
        wait_for(lambda: pid_file.exists() and (tmp_path / "n1" / "run" / "proxy.port").exists(), 30,
                 "the node's proxy to listen")
        c.cli("deploy", "fast")
        c.wait_ready("fast", 1)
        wait_for(lambda: http("GET", f"{node_url}/ready")[0] == 200, 30, "the node proxy's routes")
        results = []
        threads = [threading.Thread(target=lambda u=u: results.append(ask(u)))
                   for u in (node_url, node_url, c.url(""), c.url(""))]
        for t in threads:
            t.start()
        wait_for(lambda: c.status().deployments[0].autoscaling.load == 4, 20,
                 "the head to sum 2 + 2 requests from the two proxies")
        for t in threads:
            t.join(60)
        assert results == [200] * 4
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: int(pid_file.read_text()) != first, 30, "the scheduler to restart its proxy")
        assert wait_for(lambda: ask(node_url) == 200, 30, "the restarted node proxy to serve on the same port")
        second = int(pid_file.read_text())
        c.kill("scheduler-n1", signal.SIGTERM)
        assert not pid_alive(second), "a stopping scheduler stops its proxy"
