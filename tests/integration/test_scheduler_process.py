"""A real head (no proxy) and a real scheduler whose replicas are a stand-in process with grpc health only."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest

from gridserve.common.security import METADATA_KEY
from gridserve.v1 import head_pb2 as pb
from gridserve.v1 import head_pb2_grpc
from support.cluster import wait_reconcile_passes
from support.waiting import wait_for

GRIDSERVE = str(Path(sys.executable).parent / "gridserve")

# Behaviour is picked by the model's description: "fake:fatal" exits like an offline hub model.
FAKE_REPLICA = textwrap.dedent('''
    import argparse, asyncio, json, os, signal, sys
    from gridserve.common.model_config_proto import config_from_arg
    from gridserve.common.grpcutil import NOT_SERVING, SERVING, add_health, bind, make_server

    async def main():
        p = argparse.ArgumentParser()
        for flag in ("--replica-id", "--model-config", "--host", "--port", "--port-file", "--num-threads"):
            p.add_argument(flag, required=True)
        a, _security_flags = p.parse_known_args()
        cfg = config_from_arg(a.model_config)
        print(f"fake replica {a.replica_id} threads={a.num_threads}", file=sys.stderr, flush=True)
        if cfg.description == "fake:fatal":
            print(f"fatal: cannot load {cfg.name}: the hub is offline", file=sys.stderr)
            sys.exit(3)
        server = make_server()
        health = add_health(server)
        port = bind(server, a.host, int(a.port))
        await server.start()
        await health.set("", NOT_SERVING)
        with open(a.port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(a.port_file + ".tmp", a.port_file)
        await asyncio.sleep(0.3)  # "loading"
        await health.set("", SERVING)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(0.1)

    asyncio.run(main())
''')


def model(description: str, cpus: float) -> dict:
    return {"source": {"type": "local", "path": "/nonexistent"}, "context_length": 64, "max_tokens_limit": 32,
            "sampling": {"max_new_tokens": 16}, "resources": {"num_cpus": cpus}, "description": description}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Node:
    """A head and one scheduler as subprocesses; their logs in `root`."""

    def __init__(self, root: Path):
        self.root = root
        (root / "fake_replica.py").write_text(FAKE_REPLICA)
        (root / "models.json").write_text(json.dumps({"default_model": "ok", "models": {
            "ok": model("fake:ok", cpus=1.5), "broken": model("fake:fatal", cpus=0.5)}}))
        self.head = self.scheduler = None
        self.address = ""
        self.port = 0

    def start_head(self) -> None:
        (self.root / "state" / "head.json").unlink(missing_ok=True)
        self.head = self._spawn("head", "head", "--host", "127.0.0.1", "--grpc-port", str(self.port), "--no-proxy",
                                "--state-dir", str(self.root / "state"), "--model-configs",
                                str(self.root / "models.json"))
        info = wait_for(lambda: self._head_json(), 20, "head.json")
        self.address = info["grpc_address"]
        self.port = int(self.address.rsplit(":", 1)[1])

    def _head_json(self):
        try:
            return json.loads((self.root / "state" / "head.json").read_text())
        except (OSError, ValueError):
            return None

    def start_scheduler(self) -> None:
        self.scheduler = self._spawn("scheduler", "scheduler", "--head", self.address, "--node-id", "n1",
                                     "--num-cpus", "4", "--work-dir", str(self.root / "node"),
                                     "--replica-command", f"{sys.executable} {self.root / 'fake_replica.py'}",
                                     "--cluster-token-file", str(self.root / "state" / "cluster-token"))
        wait_for(lambda: any(n.alive for n in self.status().nodes), 20, "the node to register")

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as log:
            return subprocess.Popen([GRIDSERVE, *args], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def status(self) -> pb.ClusterStatus:
        with grpc.insecure_channel(self.address) as ch:
            return head_pb2_grpc.AdminServiceStub(ch).Status(pb.StatusRequest(), timeout=5, metadata=self.metadata)

    def cli(self, *args: str) -> str:
        res = subprocess.run([GRIDSERVE, *args, "--head", self.address, "--state-dir", str(self.root / "state")],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout

    @property
    def metadata(self) -> tuple:
        return ((METADATA_KEY, (self.root / "state" / "cluster-token").read_text().strip()),)

    def replicas(self, model: str, state: int | None = None) -> list[pb.ReplicaStatus]:
        return [r for r in self.status().replicas if r.model == model and (state is None or r.state == state)]

    def stop(self) -> None:
        for proc in (self.scheduler, self.head):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.rglob("*.log")))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("node"))
    try:
        n.start_head()
        n.start_scheduler()
        yield n
    except BaseException:
        print(n.logs())
        raise
    finally:
        n.stop()


def test_deployed_replica_becomes_ready_with_an_address_and_its_own_log(node):
    node.cli("deploy", "ok")
    ready = wait_for(lambda: node.replicas("ok", pb.REPLICA_STATE_READY), 20, "a READY replica")
    r = ready[0]
    assert r.node_id == "n1" and r.address.startswith("127.0.0.1:") and alive(r.pid)
    log = node.root / "node" / "logs" / f"{r.replica_id}.log"
    assert f"fake replica {r.replica_id} threads=4" in log.read_text()  # alone on a 4-CPU node: all 4
    assert r.replica_id in node.cli("status")


def test_fatal_replica_is_failed_with_its_message_and_never_restarted(node):
    node.cli("deploy", "broken")
    failed = wait_for(lambda: node.replicas("broken", pb.REPLICA_STATE_FAILED), 20, "a FAILED replica")
    assert failed[0].message == "fatal: cannot load broken: the hub is offline"
    wait_reconcile_passes(node.status, 3)
    again = node.replicas("broken")
    assert [(r.replica_id, r.state, r.restarts) for r in again] == [(failed[0].replica_id, pb.REPLICA_STATE_FAILED, 0)]
    dep = next(d for d in node.status().deployments if d.model == "broken")
    assert "fatal: cannot load broken" in dep.message
    node.cli("undeploy", "broken")


def test_a_killed_replica_is_restarted_under_the_same_id(node):
    before = wait_for(lambda: node.replicas("ok", pb.REPLICA_STATE_READY), 20, "a READY replica")[0]
    os.kill(before.pid, signal.SIGKILL)
    after = wait_for(lambda: [r for r in node.replicas("ok", pb.REPLICA_STATE_READY) if r.pid != before.pid],
                     20, "the replica to come back")[0]
    assert after.replica_id == before.replica_id and after.restarts == before.restarts + 1


def test_a_head_restart_keeps_running_replicas(node):
    before = wait_for(lambda: node.replicas("ok", pb.REPLICA_STATE_READY), 20, "a READY replica")[0]
    node.head.send_signal(signal.SIGKILL)
    node.head.wait(10)
    node.start_head()  # same port, same state dir
    after = wait_for(lambda: node.replicas("ok", pb.REPLICA_STATE_READY), 20, "the replica to be reported again")
    assert [(r.replica_id, r.pid) for r in after] == [(before.replica_id, before.pid)]


def test_stopping_the_scheduler_stops_its_replicas(node):
    pids = [r.pid for r in node.replicas("ok")]
    node.scheduler.send_signal(signal.SIGTERM)
    assert node.scheduler.wait(20) == 0
    wait_for(lambda: not any(alive(p) for p in pids), 10, "replica processes to exit")
    wait_for(lambda: not node.status().nodes[0].alive, 10, "the node to be marked dead")
