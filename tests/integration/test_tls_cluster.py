"""A whole cluster on TLS: head, proxy, scheduler and replica serve and dial TLS with a test-made CA."""
from __future__ import annotations

import subprocess

import pytest

from support.cluster import GRIDSERVE, Cluster, chat
from support.tls import make_certs



@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_configs):
    root = tmp_path_factory.mktemp("tls")
    c = Cluster(root, tiny_configs, tls=make_certs(root / "certs", ["127.0.0.1"]))
    with c:
        c.start_head()
        c.start_scheduler("n1", num_cpus=2)
        c.cli("deploy", "tiny")
        c.wait_ready("tiny", 1)
        yield c


def test_requests_stream_through_a_cluster_that_speaks_tls_everywhere(cluster):
    status, _, text = chat(cluster, "tiny", {"prompt": "Hello", "max_tokens": 8})
    assert status == 200 and text


def test_the_cli_needs_the_cluster_ca_to_talk_to_a_tls_head(cluster):
    res = subprocess.run([GRIDSERVE, "status", "--head", cluster.grpc_address, "--cluster-token-file",
                          str(cluster.token_file)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "cannot reach the head" in res.stderr
    assert "Traceback" not in res.stderr
    assert "tiny" in cluster.cli("status").stdout
