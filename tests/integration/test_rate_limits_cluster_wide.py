"""A key's rate limit holds across proxies: what the head's proxy admitted counts on a node's proxy."""
from __future__ import annotations

import json
import time

import pytest

from support.cluster import Cluster, http
from support.waiting import free_port, wait_for

pytestmark = pytest.mark.timeout(180)

KEY = "sk-shared-limit-1"
FAST = {"source": {"type": "fake", "tokens_per_second": 200}, "context_length": 512, "max_tokens_limit": 64,
        "sampling": {"temperature": 0.0, "max_new_tokens": 4}, "resources": {"num_cpus": 0.5}}


def ask(url: str) -> tuple[int, dict]:
    status, headers, _ = http("POST", f"{url}/v1/chat/fast", "go",
                              {"Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"}, timeout=30)
    return status, headers


def test_requests_admitted_by_one_proxy_count_against_the_key_on_another(tmp_path):
    configs = tmp_path / "models.json"
    configs.write_text(json.dumps({"default_model": "fast", "models": {"fast": FAST}}))
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY} rpm=3\n")
    with Cluster(tmp_path, configs) as c:
        c.start_head(extra=["--api-key-file", str(keys)])
        port = free_port()
        c.start_scheduler("n1", num_cpus=4, extra=["--proxy-port", str(port), "--proxy-api-key-file", str(keys)])
        node = f"http://127.0.0.1:{port}"
        c.cli("deploy", "fast")
        c.wait_ready("fast", 1)
        wait_for(lambda: http("GET", f"{node}/ready")[0] == 200, 30, "the node proxy's routes")
        assert [ask(c.url(""))[1]["x-ratelimit-remaining-requests"] for _ in range(2)] == ["2", "1"]
        # Proxies report every second; after two rounds (the head's proxy reports, then the node's proxy
        # hears back) the node's proxy has taken those 2 from its own bucket. Nothing shows it outside.
        time.sleep(5.0)  # 2 s of reports, 3 s of slack for a loaded machine
        status, headers = ask(node)
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
        status, headers = ask(node)
        assert status == 429 and headers["x-ratelimit-limit-requests"] == "3"
