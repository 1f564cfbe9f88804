"""Benchmark: `gridserve up` to the first streamed token, cold and warm, and the replica's memory.

Runs `gridserve up` in a scratch folder twice with an empty weight cache (the first start converts
the GGUF weights into the cache, the second loads them from it), and prints a table and a
JSON line: seconds to the curl line, seconds to the first token of a request sent right then,
tokens/s of one greedy 64-token stream, and the replica's RSS.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

GRIDSERVE = str(Path(sys.executable).parent / "gridserve")


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (held open together, so the kernel cannot repeat one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stream(url: str, body: dict) -> tuple[float, int, float]:
    """Returns (seconds to first chunk, chunks, total seconds) for one streamed request."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.monotonic()
    first, chunks = None, 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        while resp.read1(65536):
            first = first or time.monotonic() - t0
            chunks += 1
    return first or 0.0, chunks, time.monotonic() - t0


def one_start(root: Path, label: str, cache: Path) -> dict:
    grpc_port, http_port = free_ports(2)
    t0 = time.monotonic()
    proc = subprocess.Popen([GRIDSERVE, "up", "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                             "--state-dir", str(root / "state"), "--work-dir", str(root / "node")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    ready = threading.Event()
    threading.Thread(target=lambda: [ready.set() for line in proc.stdout if "curl -N" in line], daemon=True).start()
    try:
        if not ready.wait(900):
            raise SystemExit("gridserve up never printed the curl line")
        t_ready = time.monotonic() - t0
        url = f"http://127.0.0.1:{http_port}/v1/chat/smollm2"
        msgs = [{"role": "user", "content": "Tell me about the moon."}]
        ttft, _, _ = stream(url, {"messages": msgs, "max_tokens": 8, "temperature": 0})
        t_first = t_ready + ttft
        _, chunks, total = stream(url, {"messages": msgs, "max_tokens": 64, "temperature": 0})
        status = json.loads(subprocess.run([GRIDSERVE, "status", "--output", "json", "--head",
                                            f"127.0.0.1:{grpc_port}", "--state-dir", str(root / "state")],
                                           capture_output=True, text=True).stdout)
        rss = sum(psutil.Process(r["pid"]).memory_info().rss for r in status["replicas"] if r.get("pid"))
        return {"start": label, "curl_line_s": round(t_ready, 2), "first_token_s": round(t_first, 2),
                "stream_chunks": chunks, "stream_s": round(total, 2), "replica_rss_mib": round(rss / 2**20)}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"  # empty: the first start converts the GGUF, the second reads the cache
        rows = [one_start(Path(tmp) / "a", "cold", cache), one_start(Path(tmp) / "b", "cached", cache)]
    print(f"{'start':8} {'curl line s':>12} {'first token s':>14} {'64-tok stream s':>16} {'chunks':>7} {'RSS MiB':>8}")
    for r in rows:
        print(f"{r['start']:8} {r['curl_line_s']:>12} {r['first_token_s']:>14} {r['stream_s']:>16} "
              f"{r['stream_chunks']:>7} {r['replica_rss_mib']:>8}")
    print(json.dumps({"bench": "startup", "rows": rows}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
