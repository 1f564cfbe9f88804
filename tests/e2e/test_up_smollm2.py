"""`gridserve up` with the real SmolLM2, driven the way a user would: curl, plain HTTP, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from support.cluster import GRIDSERVE, http, pid_alive
from support.waiting import wait_for
from support.waiting import free_port



class Up:
    """A `gridserve up` process and what it printed."""

    def __init__(self, tmp):
        self.grpc_port, self.http_port = free_port(), free_port()
        self.state_dir = tmp / "state"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [GRIDSERVE, "up", "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
             "--state-dir", str(tmp / "state"), "--work-dir", str(tmp / "node")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        self.started = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def curl_line(self):
        return next((line for line in self.lines if "curl -N" in line), None)

    def url(self, path):
        return f"http://127.0.0.1:{self.http_port}{path}"

    def cli(self, *args):
        return subprocess.run([GRIDSERVE, *args, "--head", f"127.0.0.1:{self.grpc_port}", "--state-dir",
                               str(self.state_dir)], capture_output=True,
                              text=True, timeout=60)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    u = Up(tmp_path_factory.mktemp("up"))
    try:
        wait_for(lambda: u.curl_line() or u.proc.poll() is not None, 600, "gridserve up to print the curl line")
        assert u.proc.poll() is None, "\n".join(u.lines)
        print(f"gridserve up: curl line after {time.monotonic() - u.started:.1f}s")
        yield u
    finally:
        if u.proc.poll() is None:
            u.proc.send_signal(signal.SIGINT)
            try:
                u.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(u.proc.pid, signal.SIGKILL)
        print("\n".join(u.lines[-40:]))


def curl_pieces(url: str, data: str, *headers: str) -> tuple[list[bytes], float]:
    """Runs `curl -N` and returns its stdout as the separate reads it arrived in, and the TTFB."""
    cmd = ["curl", "-sS", "-N", "-X", "POST", url, "-d", data]
    for h in headers:
        cmd += ["-H", h]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    pieces, first = [], None
    while piece := os.read(proc.stdout.fileno(), 65536):
        first = first or time.monotonic() - t0
        pieces.append(piece)
    assert proc.wait(60) == 0
    return pieces, first or 0.0


def test_up_prints_the_curl_line_for_the_default_model(up):
    line = up.curl_line()
    assert f"http://127.0.0.1:{up.http_port}/v1/chat/smollm2" in line


def test_curl_streams_a_64_token_answer_in_at_least_10_chunks(up):
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
                       "max_tokens": 64, "temperature": 0.7})
    pieces, ttfb = curl_pieces(up.url("/v1/chat/smollm2"), body, "Content-Type: application/json")
    print(f"curl: {len(pieces)} chunks, first after {ttfb:.2f}s")
    assert len(pieces) >= 10, pieces
    assert b"".join(pieces).decode("utf-8").strip()


def test_curl_plain_text_body_is_one_user_message(up):
    pieces, _ = curl_pieces(up.url("/v1/chat/smollm2"), "Say hello.")
    assert b"".join(pieces).decode("utf-8").strip()


def test_greedy_capital_of_france_says_paris(up):
    body = json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                       "max_tokens": 32, "temperature": 0})
    status, _, pieces = http("POST", up.url("/v1/chat/smollm2"), body, {"Content-Type": "application/json"})
    assert status == 200
    assert "Paris" in b"".join(pieces).decode()


@pytest.mark.parametrize("path, body, ctype, want", [
    ("/v1/chat/no-such-model", "hi", "text/plain", 404),
    ("/v1/chat/smollm2", "", "text/plain", 400),
    ("/v1/chat/smollm2", "{broken", "application/json", 400),
    ("/v1/chat/smollm2", json.dumps({"prompt": "hi", "max_tokens": 5000}), "application/json", 400),
    ("/v1/chat/smollm2", "word " * 3000, "text/plain", 400),
])
def test_bad_inputs_get_their_status_and_the_cluster_keeps_serving(up, path, body, ctype, want):
    status, _, pieces = http("POST", up.url(path), body, {"Content-Type": ctype})
    assert status == want
    assert json.loads(b"".join(pieces))["error"]["message"]
    ok, _, _ = http("POST", up.url("/v1/chat/smollm2"), json.dumps({"prompt": "Hi", "max_tokens": 4}),
                    {"Content-Type": "application/json"})
    assert ok == 200


def test_concurrent_streams_do_not_corrupt_each_other(up):
    prompts = ["What is the capital of France?", "Name three colours.", "What is 2+2?"]

    def greedy(p):
        body = json.dumps({"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0})
        status, _, pieces = http("POST", up.url("/v1/chat/smollm2"), body, {"Content-Type": "application/json"})
        assert status == 200
        return b"".join(pieces).decode()

    solo = [greedy(p) for p in prompts]
    results = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, greedy(prompts[i])))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == solo


def test_status_shows_the_node_deployment_and_ready_replica(up):
    res = up.cli("status")
    assert res.returncode == 0, res.stderr
    assert "smollm2" in res.stdout and "READY" in res.stdout.upper()


def test_ctrl_c_stops_every_process_it_started(up):
    res = up.cli("status", "--output", "json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    pids = [r["pid"] for r in status["replicas"] if r.get("pid")] + [status["proxy_pid"]]
    children = subprocess.run(["pgrep", "-P", str(up.proc.pid)], capture_output=True, text=True).stdout.split()
    pids += [int(p) for p in children]
    assert pids and all(pid_alive(p) for p in pids)
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, f"no orphans among {pids}")
