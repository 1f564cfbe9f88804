"""Runs real gridserve processes (head, proxy, schedulers) on 127.0.0.1 for integration and e2e tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from gridserve.common.security import METADATA_KEY
from support.waiting import wait_for
from gridserve.v1 import head_pb2, head_pb2_grpc

READY = head_pb2.REPLICA_STATE_READY
FAILED = head_pb2.REPLICA_STATE_FAILED
GRIDSERVE = str(Path(sys.executable).parent / "gridserve")




def wait_reconcile_passes(status, passes: int = 3, timeout: float = 30) -> None:
    """Waits until `status()` (a head's ClusterStatus) shows `passes` more reconcile passes than now."""
    start = status().reconcile_passes
    wait_for(lambda: status().reconcile_passes >= start + passes, timeout, f"{passes} reconcile passes")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Cluster:
    """A head (with its proxy) and schedulers as subprocesses, their logs under `root`."""

    def __init__(self, root: Path, model_configs: Path, env: dict | None = None, tls: dict | None = None):
        self.root = Path(root)
        self.tls = tls  # {"ca", "cert", "key"} paths: every process serves and dials TLS
        self.model_configs = model_configs
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.grpc_address = ""
        self.http_address = ""
        self._channel = None

    # processes

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen([GRIDSERVE, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_head(self, extra: list[str] = (), wait_for_proxy: bool = True) -> None:
        state = self.root / "state"  # head.json stays: a restarted head adopts the proxy it names
        self.head_extra = list(extra)
        head = self._spawn("head", ["head", "--host", "127.0.0.1", "--grpc-port", "0", "--http-host", "127.0.0.1",
                             "--http-port", "0", "--state-dir", str(state),
                             "--model-configs", str(self.model_configs), *self.tls_flags(), *extra])
        key = "http_address" if wait_for_proxy else "grpc_address"
        info = wait_for(lambda: self._exited_early(head) or self._head_json(state, key, head.pid), 60,
                        f"head.json with {key}")
        self.grpc_address, self.http_address = info["grpc_address"], info.get("http_address", "")
        self._channel = (grpc.secure_channel(self.grpc_address, grpc.ssl_channel_credentials(
            Path(self.tls["ca"]).read_bytes())) if self.tls else grpc.insecure_channel(self.grpc_address))
        self.token_file = state / "cluster-token"  # the head made it; every call carries it
        self.metadata = ((METADATA_KEY, self.token_file.read_text().strip()),)

    def relaunch_head(self) -> None:
        """Starts the head again (after it was killed) with the flags it had: same state dir and ports."""
        self.start_head(self.head_extra)

    def tls_flags(self, serve: bool = True) -> list[str]:
        """What a process needs for the cluster's TLS: its cert and key when it serves, the CA always."""
        if not self.tls:
            return []
        own = ["--tls-cert", self.tls["cert"], "--tls-key", self.tls["key"]] if serve else []
        return [*own, "--tls-ca", self.tls["ca"]]

    def _exited_early(self, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            raise AssertionError(f"exited with code {proc.returncode}:\n{self.logs()}")

    @staticmethod
    def _head_json(state: Path, key: str, pid: int):
        info = json.loads((state / "head.json").read_text())
        return info if info.get(key) and info.get("pid") == pid else None

    def start_scheduler(self, node_id: str, num_cpus: float = 2, num_gpus: float = 0, extra: list[str] = ()) -> None:
        self._spawn(f"scheduler-{node_id}", ["scheduler", "--head", self.grpc_address, "--node-id", node_id,
                                             "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
                                             "--host", "127.0.0.1", "--work-dir", str(self.root / node_id),
                                             "--cluster-token-file", str(self.token_file),
                                             *self.tls_flags(), *extra])
        proc = self.procs[f"scheduler-{node_id}"]
        wait_for(lambda: self._exited_early(proc) or any(n.node_id == node_id and n.alive
                                                          for n in self.status().nodes), 30,
                 f"node {node_id} to register")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(30)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Prints every process's log (to stderr) when starting or using the cluster failed, then stops it all."""
        if exc_type is not None:
            print(self.logs(), file=sys.stderr)
        self.stop()

    def stop(self) -> None:
        """Schedulers first (they stop their replicas), then the head (it stops the proxy)."""
        for name in sorted(self.procs, key=lambda n: n == "head"):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()
        self._stop_orphaned_proxy()
        if self._channel:
            self._channel.close()

    def _stop_orphaned_proxy(self) -> None:
        """A proxy outlives a head killed with SIGKILL (by design); the test's cluster must not."""
        try:
            pid = json.loads((self.root / "state" / "head.json").read_text()).get("proxy_pid", 0)
            if pid and "gridserve.proxy" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def logs(self) -> str:
        """Which processes still run, then each log's tail without the proxy's per-request lines
        (a failing load writes thousands of them and would hide what the head and nodes said)."""
        alive = ", ".join(f"{n}={'running' if p.poll() is None else f'exited {p.returncode}'}"
                          for n, p in self.procs.items())
        parts = [f"===== processes: {alive}"]
        for path in sorted(self.root.glob("*.log")):
            lines = [ln for ln in path.read_text(errors="replace").splitlines()
                     if " request_start " not in ln and " request_done " not in ln]
            parts.append(f"===== {path.name}\n" + "\n".join(lines)[-6000:])
        return "\n".join(parts)

    # the head's admin API and the CLI

    def status(self) -> head_pb2.ClusterStatus:
        return head_pb2_grpc.AdminServiceStub(self._channel).Status(head_pb2.StatusRequest(), timeout=5,
                                                                    metadata=self.metadata)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([GRIDSERVE, *args, "--head", self.grpc_address,
                              "--cluster-token-file", str(self.token_file), *self.tls_flags(serve=False)],
                             capture_output=True, text=True,
                             env=self.env, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"gridserve {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def replicas(self, model: str | None = None, state: int | None = None) -> list:
        return [r for r in self.status().replicas
                if (model is None or r.model == model) and (state is None or r.state == state)]

    def wait_reconcile_passes(self, passes: int = 3, timeout: float = 30) -> None:
        """Waits until the head has run `passes` more reconcile passes: how a test that checks that nothing
        happens (no restart, no duplicate) gives the cluster time to do the wrong thing, without guessing a delay."""
        wait_reconcile_passes(self.status, passes, timeout)

    def wait_ready(self, model: str, count: int, timeout: float = 120) -> list:
        return wait_for(lambda: (lambda rs: rs if len(rs) >= count else None)(self.replicas(model, READY)),
                        timeout, f"{count} READY replica(s) of {model}")

    def url(self, path: str) -> str:
        return f"http://{self.http_address}{path}"

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the proxy's /metrics samples called `name` whose labels include `labels`."""
        status, _, body = http("GET", self.url("/metrics"), timeout=10)
        assert status == 200
        return sum(s.value for f in text_string_to_metric_families(b"".join(body).decode()) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def http(method: str, url: str, body: bytes | str | None = None, headers: dict | None = None,
         timeout: float = 120) -> tuple[int, dict, list[bytes]]:
    """One HTTP request; returns status, headers and the body as the pieces it arrived in."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path, body=body.encode() if isinstance(body, str) else body,
                     headers=headers or {})
        resp = conn.getresponse()
        pieces = []
        while piece := resp.read1(65536):
            pieces.append(piece)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, pieces
    finally:
        conn.close()


def chat(cluster: Cluster, model: str, body: dict | str, **kw) -> tuple[int, dict, str]:
    """POST /v1/chat/<model> with a JSON (dict) or text/plain (str) body; returns status, headers, text."""
    if isinstance(body, dict):
        data, ctype = json.dumps(body), "application/json"
    else:
        data, ctype = body, "text/plain"
    status, headers, pieces = http("POST", cluster.url(f"/v1/chat/{model}"), data, {"Content-Type": ctype}, **kw)
    return status, headers, b"".join(pieces).decode()




class ClientThreads:
    """Threads that each send one request after another until the block ends. `send(thread, turn)` makes one
    request and returns (ok, result); results are kept in the order the requests ended. After a failed
    request a thread pauses briefly: a failing cluster answers at once, and it must not be flooded."""
    failure_pause_s = 0.1
    wait_timeout_s = 60.0

    def __init__(self, threads: int = 1, join_s: float = 90):
        self.results: list = []
        self.join_s = join_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def send(self, thread: int, turn: int) -> tuple[bool, object]:
        raise NotImplementedError

    def _loop(self, thread: int) -> None:
        turn = 0
        while not self._stop.is_set():
            ok, result = self.send(thread, turn)
            self.results.append(result)
            turn += 1
            if not ok:
                time.sleep(self.failure_pause_s)

    def wait(self, count: int, timeout: float | None = None) -> None:
        """Until `count` requests have ended (in any way)."""
        wait_for(lambda: len(self.results) >= count, timeout or self.wait_timeout_s, f"{count} requests done")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.join_s)
        assert not any(t.is_alive() for t in self._threads), "a client request hung"


class RequestLoad(ClientThreads):
    """Short requests one after another from one thread; keeps (status, text, seconds, replica id) of each."""

    def __init__(self, cluster: Cluster, model: str = "tiny", body: dict | None = None):
        super().__init__()
        self.cluster, self.model = cluster, model
        self.body = body or {"prompt": "Hello", "max_tokens": 8}

    def send(self, thread: int, turn: int) -> tuple[bool, tuple[int, str, float, str]]:
        started = time.monotonic()
        try:
            status, headers, text = chat(self.cluster, self.model, self.body, timeout=60)
        except OSError as e:
            status, headers, text = 0, {}, repr(e)
        return status == 200, (status, text, time.monotonic() - started, headers.get("x-replica-id", ""))

    def failures(self) -> list:
        return [r for r in self.results if r[0] != 200 or not r[1]]
