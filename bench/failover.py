"""Benchmark: the pause a streaming client sees when the replica under its stream dies or freezes.

Starts `gridserve up --replicas 2` (SmolLM2, default settings) in a scratch folder. Each trial streams
a greedy 120-token chat with `curl`-like reading, and after 20 chunks kills (SIGKILL) or freezes
(SIGSTOP) the replica named in X-Replica-Id. It prints, per trial, the usual gap between chunks, the
gap across the failure (the longest pause after the signal), whether the text equals the no-failure
text, and a JSON line at the end. Between trials it waits for two READY replicas again.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GRIDSERVE = str(Path(sys.executable).parent / "gridserve")
MODEL = "smollm2"
BODY = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        "max_tokens": 120, "temperature": 0}
KILL_AFTER_CHUNKS = 20
TRIALS = [("SIGKILL", signal.SIGKILL)] * 3 + [("SIGSTOP", signal.SIGSTOP)]


def cli(root: Path, *args: str) -> str:
    """A gridserve admin command against the benchmark's head (its address is in the state dir's head.json)."""
    head = json.loads((root / "state" / "head.json").read_text())["grpc_address"]
    return subprocess.run([GRIDSERVE, *args, "--head", head, "--state-dir", str(root / "state")],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def replicas(root: Path) -> list[dict]:
    data = json.loads(cli(root, "replicas", "--output", "json"))
    return data if isinstance(data, list) else data["replicas"]


def wait_ready(root: Path, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(r["state"].endswith("READY") for r in replicas(root)) >= count:
            return
        time.sleep(0.5)
    raise SystemExit(f"{count} READY replicas did not show up within {timeout:.0f}s")


def stream(port: int, on_chunk=None) -> tuple[str, list[float], dict]:
    """One streamed request; returns the text, each chunk's arrival time, and the response headers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", f"/v1/chat/{MODEL}", json.dumps(BODY), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    parts, times = [], []
    while piece := resp.read1(65536):
        parts.append(piece)
        times.append(time.monotonic())
        if on_chunk:
            on_chunk(len(times), headers)
    conn.close()
    return b"".join(parts).decode(), times, headers


def trial(root: Path, port: int, sig: signal.Signals, reference: str) -> dict:
    """One stream whose replica gets `sig` after KILL_AFTER_CHUNKS chunks (its pid is looked up from the
    first chunk on, off the reading thread, so the stream is read as it arrives)."""
    pid, sent = {}, {}

    def on_chunk(n: int, headers: dict) -> None:
        if n == 1:
            rid = headers["x-replica-id"]
            threading.Thread(target=lambda: pid.update(
                v=next(r["pid"] for r in replicas(root) if r["replica_id"] == rid)), daemon=True).start()
        if n >= KILL_AFTER_CHUNKS and "v" in pid and "at" not in sent:
            os.kill(pid["v"], sig)
            sent["at"] = time.monotonic()

    text, times, _ = stream(port, on_chunk)
    gaps = [b - a for a, b in zip(times, times[1:])]
    after = [b - max(a, sent["at"]) for a, b in zip(times, times[1:]) if b > sent["at"]]
    return {"usual_gap_ms": round(statistics.median(gaps) * 1000, 1),
            "failure_gap_s": round(max(after), 2) if after else None,
            "whole": text == reference, "chunks": len(times)}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="gridserve-bench-failover-"))
    port = 18000 + os.getpid() % 1000
    up = subprocess.Popen([GRIDSERVE, "up", "--replicas", "2", "--num-cpus", "2", "--grpc-port", str(port + 1000),
                           "--http-port", str(port), "--state-dir", str(root / "state"),
                           "--work-dir", str(root / "node")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ready = threading.Event()
    threading.Thread(target=lambda: [ready.set() for line in up.stdout if "curl -N" in line], daemon=True).start()
    try:
        if not ready.wait(900):
            raise SystemExit("gridserve up never printed the curl line")
        wait_ready(root, 2)
        reference, _, _ = stream(port)
        rows = []
        for name, sig in TRIALS:
            row = {"signal": name, **trial(root, port, sig, reference)}
            rows.append(row)
            print(f"{name:8} usual gap {row['usual_gap_ms']:6.1f} ms   gap across the failure "
                  f"{row['failure_gap_s']} s   whole text: {row['whole']}   chunks {row['chunks']}", flush=True)
            wait_ready(root, 2)
        print(json.dumps({"bench": "failover", "trials": rows}))
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)


if __name__ == "__main__":
    main()
