"""The operator CLI against a real head and two real schedulers whose replicas are a stand-in process
(grpc health only, a line on stderr now and then): every command's --output json, pinning, scale, logs."""
import json
import signal
import subprocess
import sys
import textwrap

import pytest

from support.cluster import FAILED, GRIDSERVE, Cluster
from support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

# Picked by the model's description: "fake:fatal" exits like an offline hub model; others tick.
FAKE_REPLICA = textwrap.dedent('''
    import argparse, asyncio, json, os, signal, sys
    from gridserve.common.model_config_proto import config_from_arg
    from gridserve.common.grpcutil import SERVING, add_health, bind, make_server

    async def main():
        p = argparse.ArgumentParser()
        for flag in ("--replica-id", "--model-config", "--host", "--port", "--port-file", "--num-threads"):
            p.add_argument(flag, required=True)
        a, _security_flags = p.parse_known_args()
        print(f"fake replica {a.replica_id} starting", file=sys.stderr, flush=True)
        if config_from_arg(a.model_config).description == "fake:fatal":
            print("fatal: cannot load it: the hub is offline", file=sys.stderr, flush=True)
            sys.exit(3)
        server = make_server()
        health = add_health(server)
        port = bind(server, a.host, int(a.port))
        await server.start()
        await health.set("", SERVING)
        with open(a.port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(a.port_file + ".tmp", a.port_file)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tick = 0
        while not stop.is_set():
            tick += 1
            print(f"tick {tick}", file=sys.stderr, flush=True)
            try:
                await asyncio.wait_for(stop.wait(), 0.3)
            except asyncio.TimeoutError:
                pass
        await server.stop(0.1)

    asyncio.run(main())
''')


def model(description: str) -> dict:
    return {"source": {"type": "local", "path": "/nonexistent"}, "context_length": 64, "max_tokens_limit": 32,
            "sampling": {"max_new_tokens": 16}, "resources": {"num_cpus": 1, "memory_mb": 100},
            "description": description}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "fake_replica.py").write_text(FAKE_REPLICA)
    (root / "models.json").write_text(json.dumps({"default_model": "ok", "models": {
        "ok": model("fake:ok"), "other": model("fake:ok"), "broken": model("fake:fatal")}}))
    c = Cluster(root, root / "models.json")
    command = ["--replica-command", f"{sys.executable} {root / 'fake_replica.py'}"]
    with c:
        c.start_head(["--no-proxy"], wait_for_proxy=False)
        c.start_scheduler("n1", num_cpus=4, extra=command)
        c.start_scheduler("n2", num_cpus=4, extra=command)
        yield c


def cli_json(cluster, *args):
    res = cluster.cli(*args, "--output", "json")
    return json.loads(res.stdout)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1 and res.stdout == "", res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_deploy_pinned_to_a_node_places_every_replica_there_and_scale_keeps_the_pin(cluster):
    assert "on node n2" in cli_json(cluster, "deploy", "ok", "--replicas", "1", "--node", "n2")["message"]
    cluster.wait_ready("ok", 1, timeout=30)
    assert cli_json(cluster, "scale", "ok", "2")["message"] == "ok: replicas 1 -> 2"
    cluster.wait_ready("ok", 2, timeout=30)
    replicas = cli_json(cluster, "replicas", "--model", "ok")["replicas"]
    assert [r["node_id"] for r in replicas] == ["n2", "n2"]
    assert {r["state"] for r in replicas} == {"REPLICA_STATE_READY"}
    deps = {d["model"]: d for d in cli_json(cluster, "deployments")["deployments"]}
    assert deps["ok"]["node"] == "n2" and deps["ok"]["replicas"] == 2 and deps["ok"]["ready"] == 2


def test_unknown_node_and_unknown_model_are_one_line_errors(cluster):
    line = one_line_error(cluster.cli("deploy", "ok", "--node", "nope", check=False))
    assert line == "error: node 'nope' is not known to the head (nodes: n1, n2)"
    line = one_line_error(cluster.cli("scale", "never-deployed", "3", check=False))
    assert line.startswith("error: model 'never-deployed' is not deployed")
    line = one_line_error(cluster.cli("logs", "ok-ffffff", check=False))
    assert "replica 'ok-ffffff' is not known to the head" in line


def test_nodes_status_and_models_as_json(cluster):
    nodes = cli_json(cluster, "nodes")["nodes"]
    assert [(n["node_id"], n["alive"], n["capacity"]["num_cpus"]) for n in nodes] == [("n1", True, 4), ("n2", True, 4)]
    status = cli_json(cluster, "status")
    assert {"nodes", "deployments", "replicas", "routes_version"} <= set(status)
    cluster.cli("deploy", "other")
    models = {m["name"]: m for m in cli_json(cluster, "models")["models"]}
    assert set(models) == {"ok", "other", "broken"}
    assert models["other"]["deployed"] and models["other"]["replicas"] == 1 and not models["broken"]["deployed"]
    assert models["ok"]["default"] and models["ok"]["config"]["resources"]["memory_mb"] == 100
    table = cluster.cli("models").stdout
    assert "ok *" in table and "fake:fatal" in table
    assert cli_json(cluster, "undeploy", "other")["message"].startswith("undeployed other")


def test_logs_print_the_replicas_log_its_tail_and_json_lines(cluster):
    rid = cluster.wait_ready("ok", 1, timeout=30)[0].replica_id
    text = cluster.cli("logs", rid).stdout
    assert text.startswith(f"fake replica {rid} starting\n") and "tick 1\n" in text
    tail = cluster.cli("logs", rid, "--tail", "2").stdout
    assert len(tail.splitlines()) == 2 and tail.splitlines()[-1].startswith("tick ")
    lines = [json.loads(line) for line in cluster.cli("logs", rid, "-o", "json").stdout.splitlines()]
    assert lines[0] == {"replica": rid, "line": f"fake replica {rid} starting"}


def test_logs_of_a_failed_replica_show_why_it_failed(cluster):
    cluster.cli("deploy", "broken")
    failed = wait_for(lambda: cluster.replicas("broken", FAILED), 30, "a FAILED replica")[0]
    assert "fatal: cannot load it: the hub is offline" in cluster.cli("logs", failed.replica_id).stdout
    cluster.cli("undeploy", "broken")


def test_logs_follow_prints_what_is_appended_until_ctrl_c(cluster):
    rid = cluster.wait_ready("ok", 1, timeout=30)[0].replica_id
    proc = subprocess.Popen([GRIDSERVE, "logs", rid, "--follow", "--tail", "1", "--head", cluster.grpc_address,
                             "--cluster-token-file", str(cluster.token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        later = proc.stdout.readline()
        assert first.startswith("tick ") and later.startswith("tick ")
        assert int(later.split()[1]) == int(first.split()[1]) + 1  # appended after the command started
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_follow_ends_with_an_error_line_when_the_node_goes_away(cluster):
    rid = cluster.wait_ready("ok", 1, timeout=30)[0].replica_id
    node = next(r.node_id for r in cluster.replicas("ok") if r.replica_id == rid)
    proc = subprocess.Popen([GRIDSERVE, "logs", rid, "-f", "--head", cluster.grpc_address,
                             "--cluster-token-file", str(cluster.token_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline()
        cluster.kill(f"scheduler-{node}", signal.SIGTERM)
        assert proc.wait(30) == 1
        err = proc.stderr.read().strip().splitlines()
        assert len(err) == 1 and f"node {node}" in err[0], err
    finally:
        if proc.poll() is None:
            proc.kill()
