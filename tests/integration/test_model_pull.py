"""`gridserve pull` against a stand-in hub (tests/support/standin_hub.py) with the real huggingface_hub client in a real
scheduler: no route fails fast, a wrong checksum is refused, a pull cut by a killed hub resumes with a Range
request, the node reports the model, a deploy loads it from the cache (no GET), and a deploy that downloads shows it."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.cluster import GRIDSERVE, Cluster
from support.waiting import free_port, wait_for
from gridserve.cli.render import state_text
from gridserve.v1 import head_pb2

pytestmark = pytest.mark.timeout(300)

REPO = "gridserve-tests/tiny"
HUB_SCRIPT = Path(__file__).resolve().parents[1] / "support" / "standin_hub.py"
WEIGHTS = "model.safetensors"


class Hub:
    """The stand-in hub as a process on a fixed port, so it can be killed and started again at the same address."""

    def __init__(self, root: Path, port: int, requests: Path):
        self.root, self.port, self.requests = root, port, requests
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, rate: float = 0, corrupt: str = "") -> None:
        self.proc = subprocess.Popen([sys.executable, str(HUB_SCRIPT), "--root", str(self.root), "--repo", REPO,
                                      "--port", str(self.port), "--rate", str(rate), "--corrupt", corrupt,
                                      "--requests", str(self.requests)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import socket
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() or True, 20,
                 "the stand-in hub to listen")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def ranges(self, name: str) -> list[str]:
        lines = [json.loads(x) for x in self.requests.read_text().splitlines()] if self.requests.exists() else []
        return [r["range"] for r in lines if r["method"] == "GET" and r["path"].endswith("/" + name)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(tiny_model_dir, root)
    h = Hub(root, free_port(), root.parent / "requests.jsonl")
    yield h
    h.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_configs, hub):
    root = tmp_path_factory.mktemp("pull-cluster")
    configs = json.loads(tiny_configs.read_text())
    configs["models"]["tiny-hub"] = {**configs["models"]["tiny"], "source": {"type": "hub", "repo": REPO}}
    path = root / "model_configs.json"
    path.write_text(json.dumps(configs))
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(root / "hf-cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    with Cluster(root, path, env=env) as c:
        c.start_head()
        c.start_scheduler("n1", num_cpus=2)
        c.hf_cache = root / "hf-cache"
        yield c


def pull_json(cluster: Cluster, *extra: str) -> tuple[int, list[dict], str]:
    res = cluster.cli("pull", "tiny-hub", "--output", "json", *extra, check=False)
    return res.returncode, [json.loads(x) for x in res.stdout.splitlines()], res.stderr


def test_pull_from_a_node_without_a_route_to_the_hub_fails_at_once(cluster):
    started = time.monotonic()
    code, progress, _ = pull_json(cluster)
    assert code == 1 and time.monotonic() - started < 10
    assert progress[-1]["node_id"] == "n1" and "no route to the hub at http://127.0.0.1:" in progress[-1]["error"]


def test_pull_of_a_file_with_a_wrong_checksum_is_refused_and_deleted(cluster, hub):
    hub.start(corrupt=WEIGHTS)
    try:
        code, progress, _ = pull_json(cluster)
    finally:
        hub.kill()
    assert code == 1
    assert f"checksum mismatch for {WEIGHTS}: the hub says sha256" in progress[-1]["error"]
    blobs = next(cluster.hf_cache.glob("models--*/blobs"))
    assert not [p for p in blobs.iterdir() if p.stat().st_size > 10 << 20], "the bad file stayed in the cache"


def test_pull_cut_by_a_killed_hub_resumes_where_it_stopped(cluster, hub):
    hub.start(rate=3_000_000)
    cmd = [GRIDSERVE, "pull", "tiny-hub", "--output", "json", "--head", cluster.grpc_address,
           "--cluster-token-file", str(cluster.token_file)]
    cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=cluster.env)
    seen = []
    for line in cli.stdout:
        seen.append(json.loads(line))
        if seen[-1]["done_bytes"] > 6 << 20:  # well into the weights: at least one 1 MiB piece is on disk
            hub.kill()
            break
    rest = [json.loads(x) for x in cli.stdout]
    assert cli.wait(60) == 1
    assert "pull again to resume" in rest[-1]["error"], rest[-1]
    assert any(p["total_bytes"] and p["bytes_per_second"] > 0 and 0 < p["done_bytes"] < p["total_bytes"]
               for p in seen), "no progress with bytes, total and rate"
    partial = next(cluster.hf_cache.glob("models--*/blobs/*.incomplete")).stat().st_size
    assert partial >= 1 << 20

    hub.start()
    code, progress, _ = pull_json(cluster)
    assert code == 0, progress
    assert progress[-1]["done"] and progress[-1]["done_bytes"] == progress[-1]["total_bytes"] > 12 << 20
    ranges = hub.ranges(WEIGHTS)
    assert ranges[-1] == f"bytes={partial}-", ranges  # the resumed pull asked only for what was missing


def test_models_shows_the_node_that_holds_a_pulled_model(cluster):
    def listed():
        data = json.loads(cluster.cli("models", "--output", "json").stdout)
        hub_model = next(m for m in data["models"] if m["name"] == "tiny-hub")
        cached = any(c["repo"] == REPO for c in data["node_caches"])  # from Status: up to 1 s behind Models
        return data if hub_model["cached_on"] == ["n1"] and cached else None
    data = wait_for(listed, 20, "tiny-hub cached on n1")
    cache = next(c for c in data["node_caches"] if c["repo"] == REPO)
    assert cache["node"] == "n1" and cache["refs"] == ["main"] and cache["size_bytes"] > 12 << 20
    assert "n1" in cluster.cli("models").stdout.split("tiny-hub", 1)[1].splitlines()[0]


def test_pull_without_a_terminal_prints_plain_lines_per_node_and_a_summary(cluster, hub):
    res = cluster.cli("pull", "tiny-hub", "--node", "n1")
    lines = res.stdout.strip().splitlines()
    assert all(line.startswith("n1  ") for line in lines[:-1]), lines
    assert lines[-2].startswith("n1  done   15.6MiB in 7 file(s)") and lines[-1] == f"pulled {REPO} to 1 node(s)"


def test_deploy_of_a_pulled_model_loads_it_from_the_cache(cluster, hub):
    """The replica's transformers only asks the hub what the current files are (HEAD): no file is fetched again."""
    gets = len(hub.ranges(WEIGHTS))
    cluster.cli("deploy", "tiny-hub")
    try:
        cluster.wait_ready("tiny-hub", 1, timeout=120)
        assert len(hub.ranges(WEIGHTS)) == gets
    finally:
        hub.kill()
        cluster.cli("undeploy", "tiny-hub")
        wait_for(lambda: not cluster.replicas("tiny-hub"), 60, "tiny-hub replicas to go")


def test_a_replica_downloading_its_model_shows_starting_downloading_in_status(cluster, hub):
    shutil.rmtree(cluster.hf_cache, ignore_errors=True)
    hub.start(rate=4_000_000)
    try:
        cluster.cli("deploy", "tiny-hub")

        def downloading():
            rs = [r for r in cluster.replicas("tiny-hub") if r.HasField("download") and r.download.done_bytes]
            return rs[0] if rs else None
        r = wait_for(downloading, 60, "a replica reporting its download")
        assert r.state == head_pb2.REPLICA_STATE_STARTING and r.download.total_bytes > 12 << 20
        assert state_text(r).startswith("STARTING (downloading ")
        cluster.wait_ready("tiny-hub", 1, timeout=120)
        assert not cluster.replicas("tiny-hub")[0].HasField("download")
    finally:
        hub.kill()
        cluster.cli("undeploy", "tiny-hub", check=False)
