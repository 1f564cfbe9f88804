"""The dashboard's JSON and SSE endpoints on a real head, proxy and scheduler with the tiny model: the cluster
view joins Status with each replica's Info, the history fills with load, admin actions reach the head (its errors
come back as JSON), and a replica's log streams as Server-Sent Events through the head's log relay."""
from __future__ import annotations

import http.client
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from support.cluster import Cluster, chat, http as request
from support.waiting import wait_for

pytestmark = pytest.mark.timeout(180)

ADMIN = "adm-integration-0001"
ACTION = {"Authorization": f"Bearer {ADMIN}", "X-Gridserve-Admin": "1", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_configs):
    root = tmp_path_factory.mktemp("dashboard-api")
    (root / "admin").write_text(f"{ADMIN}\n")
    with Cluster(root, tiny_configs) as c:
        c.start_head(["--admin-key-file", str(root / "admin")])
        c.start_scheduler("n1", num_cpus=2)
        c.cli("deploy", "tiny")
        c.wait_ready("tiny", 1)
        yield c


def get(cluster: Cluster, path: str) -> tuple[int, dict]:
    """GET with its query string (support.cluster's http() sends the path only)."""
    url = urlsplit(cluster.url(path))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", f"{url.path}?{url.query}" if url.query else url.path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def act(cluster: Cluster, action: str, body: dict) -> tuple[int, dict]:
    status, _, data = request("POST", cluster.url(f"/dashboard/api/admin/{action}"), json.dumps(body), ACTION)
    return status, json.loads(b"".join(data))


def test_the_head_hands_the_admin_key_to_its_proxy_in_a_private_file_not_on_its_command_line(cluster):
    path = cluster.root / "state" / "admin-keys"
    assert path.read_text() == f"{ADMIN}\n" and path.stat().st_mode & 0o777 == 0o600
    proxy_pid = cluster.status().proxy_pid
    argv = Path(f"/proc/{proxy_pid}/cmdline").read_bytes().decode().split("\0")
    assert "--admin-key-file" in argv and not any(ADMIN in a for a in argv)


def test_cluster_view_joins_the_heads_status_with_each_replicas_info(cluster):
    assert get(cluster, "/dashboard/api/config")[1] == {"api_keys_required": False, "actions_enabled": True}
    rid = cluster.wait_ready("tiny", 1)[0].replica_id
    view = wait_for(lambda: (lambda v: v if v["replicas"] and v["replicas"][0]["info"] else None)(
        get(cluster, "/dashboard/api/cluster")[1]), 10, "a replica with its Info")
    assert view["head_up"] and view["now"] - view["polled_at"] < 3
    assert [(n["node_id"], n["alive"], n["capacity"]["cpus"]) for n in view["nodes"]] == [("n1", True, 2.0)]
    assert [(d["model"], d["replicas"], d["ready"]) for d in view["deployments"]] == [("tiny", 1, 1)]
    r = view["replicas"][0]
    assert (r["replica_id"], r["state"], r["node_id"]) == (rid, "READY", "n1")
    assert r["info"]["rss_bytes"] > 0 and r["info"]["running"] == 0
    assert view["proxies"][0]["this"] and view["proxy"]["head_connected"]


def test_history_shows_the_requests_of_the_last_seconds(cluster):
    for _ in range(3):
        assert chat(cluster, "tiny", {"prompt": "Hello", "max_tokens": 4})[0] == 200
    history = wait_for(lambda: (lambda h: h if any(v for v in h["requests_per_s"].get("tiny", []) if v) else None)(
        get(cluster, "/dashboard/api/history")[1]), 15, "requests in the history")
    assert history["interval_s"] == 2.0 and history["window_s"] == 900
    assert len(history["t"]) == len(history["ttft_p50_ms"]) == len(history["requests_per_s"]["tiny"])
    assert any(v for v in history["ttft_p50_ms"] if v)


def test_admin_actions_reach_the_head_and_its_errors_come_back_as_json(cluster):
    assert act(cluster, "scale", {"model": "tiny", "replicas": 2})[0] == 200
    assert [d.replicas for d in cluster.status().deployments] == [2]
    assert act(cluster, "scale", {"model": "tiny", "replicas": 1})[0] == 200
    status, body = act(cluster, "deploy", {"model": "no-such-model"})
    assert status in (400, 404) and "no-such-model" in body["error"]["message"]
    status, body = act(cluster, "deploy", {"model": "tiny", "replicas": 0})
    assert status == 400 and "replicas" in body["error"]["message"]
    status, body = act(cluster, "deploy", {"model": "tiny-gpu", "replicas": 1})
    assert status == 200 and body["message"]
    assert {d.model for d in cluster.status().deployments} == {"tiny", "tiny-gpu"}
    assert act(cluster, "undeploy", {"model": "tiny-gpu"})[0] == 200
    assert {d.model for d in cluster.status().deployments} == {"tiny"}
    catalog = get(cluster, "/dashboard/api/catalog")[1]["models"]
    assert {m["name"]: m["deployed"] for m in catalog} == {"tiny": True, "tiny-gpu": False, "gpt2": False}


def test_a_replica_log_streams_as_server_sent_events_and_leaving_cancels_the_relay(cluster):
    rid = cluster.wait_ready("tiny", 1)[0].replica_id
    status, body = get(cluster, "/dashboard/api/logs?replica=nope-123456")
    assert status == 404 and "nope-123456" in body["error"]["message"], body
    assert get(cluster, f"/dashboard/api/logs?replica={rid}&tail=-1")[0] == 400
    url = urlsplit(cluster.url(f"/dashboard/api/logs?replica={rid}&tail=3"))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", f"{url.path}?{url.query}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        seen = b""
        while seen.count(b"event: line\n") < 3:
            seen += resp.read1(65536)
        assert b"data: \"" in seen
        assert chat(cluster, "tiny", {"prompt": "Hello", "max_tokens": 2})[0] == 200
        while b"generate_done" not in seen:  # followed: what the replica logs now arrives too
            seen += resp.read1(65536)
    finally:
        conn.close()
    head_log = cluster.root / "head.log"
    wait_for(lambda: "log_stream_closed" in head_log.read_text(), 10, "the head to close the log stream")
