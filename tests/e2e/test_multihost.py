"""Three hosts on one machine (network namespaces on a bridge): head + proxy on one, a scheduler on each
of two others. Deploys across nodes, streams from the head's host, cuts a node's link and restores it,
and shows that a scheduler with a wrong cluster token is refused. Uses the tiny model to stay fast."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import pytest

from support.cluster import ClientThreads, wait_reconcile_passes
from support.waiting import wait_for
from support.netns import NetLab, can_make_namespaces

pytestmark = [pytest.mark.skipif(bool(can_make_namespaces()), reason=can_make_namespaces())]
GRIDSERVE = str(Path(sys.executable).parent / "gridserve")
NODE_TIMEOUT = 5


class LanCluster:
    """The processes of the test, each in its host's namespace, logs under `root`."""

    def __init__(self, lab: NetLab, root: Path, configs: Path):
        self.lab, self.root, self.configs = lab, root, configs
        self.ips = {h: lab.add_host(h) for h in ("head", "n1", "n2", "n3")}
        self.head = f"{self.ips['head']}:50051"
        self.http = f"{self.ips['head']}:8000"
        self.state = root / "state"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def spawn(self, host: str, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        return self.lab.popen(host, GRIDSERVE, *args, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def start_head(self) -> None:
        self.spawn("head", "head", "head", "--host", self.ips["head"], "--grpc-port", "50051",
                   "--http-host", self.ips["head"], "--http-port", "8000", "--state-dir", str(self.state),
                   "--model-configs", str(self.configs), "--node-timeout", str(NODE_TIMEOUT))
        wait_for(lambda: json.loads((self.state / "head.json").read_text()).get("http_address"), 60, "the head")

    def start_scheduler(self, host: str, *token_args: str) -> None:
        token_args = token_args or ("--cluster-token-file", str(self.state / "cluster-token"))
        self.spawn(host, f"scheduler-{host}", "scheduler", "--head", self.head, "--node-id", host,
                   "--num-cpus", "2", "--work-dir", str(self.root / host), *token_args)

    def cli(self, *args: str) -> str:
        res = self.lab.run("head", GRIDSERVE, *args, "--head", self.head, "--state-dir", str(self.state),
                           capture_output=True, text=True, timeout=60, env=self.env)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def status(self) -> dict:
        return json.loads(self.cli("status", "-o", "json"))

    def ready(self) -> list[dict]:
        return [r for r in self.status()["replicas"] if r["state"] == "REPLICA_STATE_READY"]

    def alive_nodes(self) -> set[str]:
        return {n["node_id"] for n in self.status()["nodes"] if n.get("alive")}

    def chat(self) -> tuple[int, str]:
        """One request from the head's host with curl; returns the status and the replica that answered."""
        res = self.lab.run("head", "curl", "-s", "-m", "30", "-D", "-", "-o", "/dev/null", "-X", "POST",
                           f"http://{self.http}/v1/chat/tiny", "-H", "Content-Type: application/json",
                           "-d", json.dumps({"prompt": "Hello", "max_tokens": 8}),
                           capture_output=True, text=True, timeout=60)
        lines = res.stdout.splitlines()
        status = int(lines[0].split()[1]) if lines else 0
        replica = next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("x-replica-id:")), "")
        return status, replica

    def stream(self, max_tokens: int = 120) -> tuple[int, str]:
        """One greedy streamed chat from the head's host with curl -N; returns curl's exit code and the text."""
        res = self.lab.run("head", "curl", "-sN", "-m", "60", "-X", "POST", f"http://{self.http}/v1/chat/tiny",
                           "-H", "Content-Type: application/json",
                           "-d", json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens,
                                             "temperature": 0}),
                           capture_output=True, text=True, timeout=90)
        return res.returncode, res.stdout

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.root.glob("*.log"))


@pytest.fixture(scope="module")
def lan(tmp_path_factory, tiny_configs):
    lab = NetLab()
    c = LanCluster(lab, tmp_path_factory.mktemp("lan"), tiny_configs)
    try:
        c.start_head()
        c.start_scheduler("n1")
        c.start_scheduler("n2")
        wait_for(lambda: c.alive_nodes() >= {"n1", "n2"}, 60, "both nodes to register")
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        lab.teardown()


def test_replicas_spread_over_nodes_and_register_their_lan_addresses(lan):
    lan.cli("deploy", "tiny", "--replicas", "2")
    ready = wait_for(lambda: (lambda r: r if len(r) == 2 else None)(lan.ready()), 120, "2 READY replicas")
    assert {r["node_id"] for r in ready} == {"n1", "n2"}
    for r in ready:
        assert r["address"].startswith(lan.ips[r["node_id"]] + ":"), r


def test_requests_from_the_head_host_reach_replicas_on_both_nodes(lan):
    seen = set()
    for _ in range(20):
        status, replica = lan.chat()
        assert status == 200
        seen.add(replica)
    assert len(seen) == 2


class StreamLoop(ClientThreads):
    """Threads streaming greedy chats with curl from the head's host until stopped; keeps (rc, text)."""

    def __init__(self, lan: LanCluster, threads: int = 4):
        super().__init__(threads=threads, join_s=120)
        self.lan = lan

    def send(self, thread: int, turn: int) -> tuple[bool, tuple[int, str]]:
        return True, self.lan.stream()  # never paused: every result is checked against the reference


class WatchedStream:
    """One greedy streamed chat (curl -N -i) read as it arrives: its headers, then its first text, so a
    link can be cut while it is known to be mid-stream on a given replica."""

    def __init__(self, lan: LanCluster, max_tokens: int = 120):
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0})
        self.proc = lan.lab.popen("head", "curl", "-sN", "-i", "-m", "90", "-X", "POST",
                                  f"http://{lan.http}/v1/chat/tiny", "-H", "Content-Type: application/json",
                                  "-d", body, stdout=subprocess.PIPE)
        self.headers: dict[str, str] = {}
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line and self.headers:
                break
            if ":" in line:
                key, value = line.split(":", 1)
                self.headers[key.strip().lower()] = value.strip()
        self.first = self.proc.stdout.read1(65536)  # blocks until the first text has arrived
        self.first_at = time.monotonic()

    def finish(self) -> tuple[int, str]:
        """Reads to the end; (curl's exit code, the whole body, newlines read as `stream` reads them)."""
        text = (self.first + self.proc.stdout.read()).decode(errors="replace")
        return self.proc.wait(30), text.replace("\r\n", "\n").replace("\r", "\n")


def stream_on(lan: LanCluster, replicas: set[str]) -> WatchedStream | None:
    """A stream whose first text came from one of `replicas`, or None (that stream read to its end)."""
    watched = WatchedStream(lan)
    if watched.headers.get("x-replica-id") in replicas:
        return watched
    watched.finish()
    return None


def test_a_node_whose_link_goes_down_leaves_the_routes_and_traffic_continues(lan):
    """A stream in flight on n1 when its link is cut stalls until the proxy's keepalive gives the
    connection up, then resumes on n2 and ends whole; so does every stream of the load around it."""
    reference = lan.stream()
    assert reference[0] == 0 and reference[1]
    on_n1 = {r["replica_id"] for r in lan.ready() if r["node_id"] == "n1"}
    with StreamLoop(lan) as load:
        wait_for(lambda: len(load.results) >= 8, 60, "streams under way on both nodes")
        watched = wait_for(lambda: stream_on(lan, on_n1), 60, "a stream answered from n1")
        lan.lab.set_link("n1", False)
        cut = time.monotonic()
        wait_for(lambda: "n1" not in lan.alive_nodes(), 3 * NODE_TIMEOUT, "n1 to be marked dead")
        print(f"n1 marked dead {time.monotonic() - cut:.1f}s after its link went down "
              f"({(cut - watched.first_at) * 1000:.0f} ms after the watched stream's first text)")
        during = len(load.results)
        wait_for(lambda: len(load.results) >= during + 8, 90, "streams after the cut")
        rc, text = watched.finish()
    request_id = watched.headers["x-request-id"]
    moved = [ln for ln in (lan.root / "head.log").read_text().splitlines()
             if " failover " in ln and f"request_id={request_id}" in ln]
    broken = [r for r in load.results if r != reference]
    print(f"{len(load.results)} streams across the cut, {len(broken)} not whole; the watched one: {moved}")
    assert (rc, text) == reference, "the stream cut off on n1 ends whole"
    assert moved and "outcome=resumed" in moved[0], "the stream cut off on n1 moved to n2"
    assert broken == [], broken[:2]
    wait_for(lambda: all(r["node_id"] != "n1" for r in lan.ready()), 10, "n1's replica to leave the routes")
    results = [lan.chat() for _ in range(10)]
    assert all(status == 200 for status, _ in results), results
    n2 = {r["replica_id"] for r in lan.ready() if r["node_id"] == "n2"}
    assert {replica for _, replica in results} <= n2
    wait_for(lambda: len([r for r in lan.ready() if r["node_id"] == "n2"]) == 2, 120,
             "a replacement replica on n2")


def test_a_node_that_comes_back_rejoins_without_duplicate_replicas(lan):
    lan.lab.set_link("n1", True)
    back = time.monotonic()
    wait_for(lambda: "n1" in lan.alive_nodes(), 60, "n1 to reconnect")
    print(f"n1 alive again {time.monotonic() - back:.1f}s after its link came back")
    wait_for(lambda: len(lan.status()["replicas"]) == 2 and len(lan.ready()) == 2, 60,
             "exactly 2 replicas, all READY")
    wait_reconcile_passes(lambda: SimpleNamespace(reconcile_passes=int(lan.status().get("reconcile_passes", 0))), 3)
    assert len(lan.status()["replicas"]) == 2
    assert all(lan.chat()[0] == 200 for _ in range(5))


def test_a_scheduler_with_a_wrong_token_is_refused_and_changes_nothing(lan):
    before = lan.status()
    lan.start_scheduler("n3", "--cluster-token", "not-the-cluster-token-at-all")
    log = lan.root / "scheduler-n3.log"
    wait_for(lambda: "head_refused_token" in log.read_text(), 30, "the scheduler to be refused")
    assert "unauthenticated_call" in (lan.root / "head.log").read_text()
    after = lan.status()
    assert "n3" not in {n["node_id"] for n in after["nodes"]}
    assert len(after["replicas"]) == len(before["replicas"])
