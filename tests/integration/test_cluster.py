"""A real head, proxy, scheduler and replica processes on 127.0.0.1 serving the tiny model."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from support.cluster import FAILED, READY, Cluster, chat, http, pid_alive
from support.waiting import wait_for
from support.reflect import list_services



@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_configs):
    c = Cluster(tmp_path_factory.mktemp("cluster"), tiny_configs)
    with c:
        c.start_head()
        c.start_scheduler("n1", num_cpus=4)
        c.cli("deploy", "tiny", "--replicas", "1")
        c.wait_ready("tiny", 1)
        yield c


def error_of(text: str) -> dict:
    body = json.loads(text)
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    return body["error"]


def test_plain_text_prompt_streams_in_several_chunks_with_request_id(cluster):
    status, headers, pieces = http("POST", cluster.url("/v1/chat/tiny"), "Hello there",
                                   {"Content-Type": "text/plain", "X-Request-Id": "it-req-1"})
    assert status == 200, pieces
    assert headers["content-type"].startswith("text/plain")
    assert headers["x-request-id"] == "it-req-1"
    assert len(pieces) >= 3, pieces
    assert b"".join(pieces).decode().strip()


def test_json_messages_with_greedy_sampling_are_deterministic(cluster):
    body = {"messages": [{"role": "user", "content": "Count to five"}], "max_tokens": 12, "temperature": 0}
    first, second = chat(cluster, "tiny", body), chat(cluster, "tiny", body)
    assert first[0] == second[0] == 200
    assert first[2] == second[2] and first[2]


def test_raw_prompt_and_stop_string_are_honoured(cluster):
    status, _, text = chat(cluster, "tiny", {"prompt": "The list:", "max_tokens": 16, "temperature": 0})
    assert status == 200 and text
    stop = text[len(text) // 2:][:2]
    if stop.strip():
        status, _, cut = chat(cluster, "tiny", {"prompt": "The list:", "max_tokens": 16, "temperature": 0,
                                                "stop": [stop]})
        assert status == 200 and stop not in cut and text.startswith(cut)


@pytest.mark.parametrize("model, body, ctype, want", [
    ("nope", "hi", "text/plain", 404),
    ("tiny", "", "text/plain", 400),
    ("tiny", "{not json", "application/json", 400),
    ("tiny", json.dumps({"messages": "hi"}), "application/json", 400),
    ("tiny", json.dumps({"prompt": "hi", "max_tokens": 0}), "application/json", 400),
    ("tiny", json.dumps({"prompt": "hi", "max_tokens": 100000}), "application/json", 400),
    ("tiny", json.dumps({"prompt": "hi", "temperature": -1}), "application/json", 400),
    ("tiny", "word " * 2000, "text/plain", 400),
])
def test_bad_input_gets_json_error_and_cluster_keeps_serving(cluster, model, body, ctype, want):
    status, _, pieces = http("POST", cluster.url(f"/v1/chat/{model}"), body, {"Content-Type": ctype})
    assert status == want, pieces
    err = error_of(b"".join(pieces).decode())
    assert err["message"]
    assert chat(cluster, "tiny", "still there?")[0] == 200


def test_prompt_longer_than_context_names_both_lengths(cluster):
    status, _, text = chat(cluster, "tiny", "word " * 2000)
    assert status == 400
    assert "256" in error_of(text)["message"]


def test_health_ready_and_models_endpoints(cluster):
    assert http("GET", cluster.url("/health"))[0] == 200
    assert http("GET", cluster.url("/ready"))[0] == 200
    status, _, pieces = http("GET", cluster.url("/v1/models"))
    assert status == 200
    assert [m["id"] for m in json.loads(b"".join(pieces))["data"]] == ["tiny"]


def test_client_disconnect_mid_stream_leaves_replica_serving(cluster):
    import socket

    host, port = cluster.http_address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 128})
        s.sendall(f"POST /v1/chat/tiny HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        assert b"200" in s.recv(200)
    assert chat(cluster, "tiny", "after a disconnect")[0] == 200


def test_scaling_up_sends_traffic_to_the_new_replica_without_restarts(cluster):
    proxy_pid = cluster.status().proxy_pid
    cluster.cli("deploy", "tiny", "--replicas", "2")
    ready = cluster.wait_ready("tiny", 2)
    seen = set()
    for _ in range(30):
        status, headers, _ = http("POST", cluster.url("/v1/chat/tiny"), json.dumps({"prompt": "hi", "max_tokens": 2}),
                                  {"Content-Type": "application/json"})
        assert status == 200
        seen.add(headers["x-replica-id"])
        if len(seen) == 2:
            break
    assert seen == {r.replica_id for r in ready}
    assert cluster.status().proxy_pid == proxy_pid


def test_killed_replica_is_replaced_and_requests_keep_succeeding(cluster):
    before = cluster.wait_ready("tiny", 2)
    victim = before[0]
    os.kill(victim.pid, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses.append(chat(cluster, "tiny", {"prompt": "hi", "max_tokens": 4})[0])
        ready = cluster.replicas("tiny", READY)
        if len(ready) == 2 and all(r.pid != victim.pid for r in ready):
            break
    else:
        raise AssertionError(f"replica not replaced: {cluster.status()}")
    assert set(statuses) == {200}, statuses
    assert chat(cluster, "tiny", "after the crash")[0] == 200


def test_killed_proxy_is_restarted_on_the_same_address(cluster):
    old = cluster.status().proxy_pid
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: http("GET", cluster.url("/health"), timeout=2)[0] == 200 and cluster.status().proxy_pid != old,
             30, "a new proxy on the same address")
    print(f"proxy back after {time.monotonic() - t0:.2f}s")
    assert cluster.status().proxy_restarts >= 1
    assert chat(cluster, "tiny", "via the new proxy")[0] == 200


def test_deployment_that_cannot_be_placed_answers_503_with_retry_after(cluster):
    cluster.cli("deploy", "tiny-gpu")
    wait_for(lambda: any(d.model == "tiny-gpu" for d in cluster.status().deployments), 10, "tiny-gpu deployment")
    status, headers, pieces = http("POST", cluster.url("/v1/chat/tiny-gpu"), "hi", {"Content-Type": "text/plain"})
    assert status == 503 and int(headers["retry-after"]) >= 1
    error_of(b"".join(pieces).decode())
    dep = next(d for d in cluster.status().deployments if d.model == "tiny-gpu")
    assert "GPU" in dep.message
    assert http("GET", cluster.url("/ready"))[0] == 503
    cluster.cli("undeploy", "tiny-gpu")


def test_hub_model_offline_fails_with_a_clear_message_and_no_restart_loop(cluster):
    cluster.cli("deploy", "gpt2")
    failed = wait_for(lambda: cluster.replicas("gpt2", FAILED), 90, "gpt2 replica to fail")
    assert "hub" in failed[0].message.lower() or "network" in failed[0].message.lower(), failed[0].message
    cluster.wait_reconcile_passes(3)
    again = cluster.replicas("gpt2")
    assert len(again) == 1 and again[0].state == FAILED and again[0].restarts == 0
    out = cluster.cli("status").stdout
    assert "gpt2" in out and "FAILED" in out.upper()
    cluster.cli("undeploy", "gpt2")


def test_status_lists_nodes_deployments_and_replicas(cluster):
    out = cluster.cli("status").stdout
    assert "n1" in out and "tiny" in out
    replica = cluster.replicas("tiny", READY)[0]
    assert replica.replica_id in out and replica.address in out


def test_undeploy_stops_replicas_and_the_model_answers_404(cluster):
    pids = [r.pid for r in cluster.replicas("tiny")]
    cluster.cli("undeploy", "tiny")
    wait_for(lambda: not cluster.replicas("tiny"), 30, "tiny replicas to go")
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "replica processes to exit")
    assert chat(cluster, "tiny", "hi")[0] == 404


def test_the_head_lists_its_services_by_reflection_to_a_caller_with_the_cluster_token(cluster):
    token = cluster.token_file.read_text().strip()
    services, methods = list_services(cluster.grpc_address, token, describe="gridserve.v1.AdminService")
    assert {"gridserve.v1.NodeService", "gridserve.v1.RouteService", "gridserve.v1.AdminService",
            "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} == set(services)
    assert "Deploy" in methods and "Status" in methods
