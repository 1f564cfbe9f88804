"""A full replica behind the real head, scheduler and proxy: 429 with Retry-After once its batch and queue are full."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from support.cluster import Cluster, chat
from gridserve.v1 import replica_pb2, replica_pb2_grpc

CONCURRENT = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    """One replica that takes a single request at a time (max_batch_size 1, no queue), on two CPUs."""
    root = tmp_path_factory.mktemp("admission")
    tiny = {"source": {"type": "local", "path": str(tiny_model_dir)}, "context_length": 256,
            "max_tokens_limit": 128, "sampling": {"temperature": 0.0, "max_new_tokens": 32},
            "resources": {"num_cpus": 2}, "max_batch_size": 1, "max_waiting": 0}
    configs = root / "model_configs.json"
    configs.write_text(json.dumps({"default_model": "tiny", "models": {"tiny": tiny}}))
    c = Cluster(root, configs)
    with c:
        c.start_head()
        c.start_scheduler("n1", num_cpus=2)
        c.cli("deploy", "tiny", "--replicas", "1")
        c.wait_ready("tiny", 1)
        yield c


def test_replica_runs_with_the_configured_cpus_and_limits(cluster):
    address = cluster.replicas("tiny")[0].address
    with grpc.insecure_channel(address) as ch:
        stub = replica_pb2_grpc.ReplicaStub(ch)
        info = stub.Info(replica_pb2.InfoRequest(), timeout=5, metadata=cluster.metadata)
    assert (info.num_threads, info.max_batch_size, info.max_waiting) == (2, 1, 0)


def test_requests_beyond_batch_and_queue_get_429_with_retry_after_and_the_rest_succeed(cluster):
    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 128}
    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(lambda _: chat(cluster, "tiny", body), range(CONCURRENT)))
    ok = [a for a in answers if a[0] == 200]
    full = [a for a in answers if a[0] != 200]
    assert ok and full, [a[0] for a in answers]
    assert all(text for _, _, text in ok)
    for status, headers, text in full:
        error = json.loads(text)["error"]
        assert status == 429 and headers["retry-after"] == "1"
        assert error["type"] == "overloaded_error" and "max_batch_size=1" in error["message"]
    assert chat(cluster, "tiny", {**body, "max_tokens": 4})[0] == 200  # a free replica serves again
