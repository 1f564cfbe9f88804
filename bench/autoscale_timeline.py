"""Benchmark: an autoscaled fake-engine deployment under a step load 0 -> 16 streams -> 0, as a timeline.

Starts a head and one scheduler on 127.0.0.1, deploys a `fake` model (20 tokens/s per stream, 40-token
answers) autoscaled 0..8 replicas at 2 ongoing requests each, then runs 16 client streams for 60 s and
stops them. It samples the head's status twice a second and records every request, then writes
`docs/autoscaling_timeline.png` (replicas, load and time to first token over time) and prints a JSON
line: the first token after zero, a normal cold start (deploy to first token, fixed count), the peak
replica count, when it came back to zero, and the failed requests.

    .venv/bin/python bench/autoscale_timeline.py [--out docs/autoscaling_timeline.png]
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from support.cluster import Cluster  # noqa: E402
from support.waiting import free_port, wait_for  # noqa: E402

FAKE = {"source": {"type": "fake", "tokens_per_second": 20}, "context_length": 512, "max_tokens_limit": 128,
        "sampling": {"temperature": 0.0, "max_new_tokens": 40}, "resources": {"num_cpus": 0.5}}
SCALING = {"min_replicas": 0, "max_replicas": 8, "target_ongoing_requests": 2, "upscale_delay_s": 3,
           "downscale_delay_s": 20, "look_back_period_s": 3}
IDLE_S, LOAD_S, TAIL_S, STREAMS = 10, 60, 60, 16


def ttft(c: Cluster, model: str) -> tuple[int, float, float]:
    """(status, seconds to the first body piece, total seconds) of one native chat request."""
    host, port = c.http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    t0 = time.monotonic()
    try:
        conn.request("POST", f"/v1/chat/{model}", body="go", headers={"Content-Type": "text/plain"})
        resp = conn.getresponse()
        first = resp.read1(65536) and time.monotonic() - t0
        while resp.read1(65536):
            pass
        return resp.status, first or time.monotonic() - t0, time.monotonic() - t0
    finally:
        conn.close()


def sample(c: Cluster, t0: float, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        d = next((d for d in c.status().deployments if d.model == "auto"), None)
        if d is not None:
            out.append((time.monotonic() - t0, d.replicas, d.ready, d.autoscaling.load))
        stop.wait(0.5)


def client(c: Cluster, t0: float, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        start = time.monotonic() - t0
        status, first, total = ttft(c, "auto")
        out.append((start, status, first, total))


def cold_start(c: Cluster) -> float:
    """Deploy of a fixed one-replica fake model to its first token."""
    t0 = time.monotonic()
    c.cli("deploy", "fixed", "--replicas", "1")
    wait_for(lambda: ttft(c, "fixed")[0] == 200, 120, "the fixed model's first answer", interval=0.2)
    took = time.monotonic() - t0
    c.cli("undeploy", "fixed")
    return took


def plot(samples: list, requests: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = [s[0] for s in samples]
    ax1.step(t, [s[1] for s in samples], where="post", label="target replicas")
    ax1.step(t, [s[2] for s in samples], where="post", label="ready replicas")
    ax1.plot(t, [s[3] for s in samples], alpha=0.6, label="load (ongoing + queued requests)")
    ax1.set_ylabel("count")
    ax1.legend(loc="upper right")
    ok = [r for r in requests if r[1] == 200]
    ax2.scatter([r[0] for r in ok], [r[2] for r in ok], s=6, label="time to first token")
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds")
    ax2.set_xlabel(f"seconds ({STREAMS} client streams from t={IDLE_S} to t={IDLE_S + LOAD_S})")
    ax2.legend(loc="upper right")
    fig.suptitle("gridserve autoscaling: fake engine, 0..8 replicas, target 2 ongoing requests each")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "autoscaling_timeline.png"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        configs = Path(tmp) / "models.json"
        configs.write_text(json.dumps({"default_model": "auto", "models": {
            "auto": {**FAKE, "autoscaling": SCALING}, "fixed": FAKE}}))
        with Cluster(Path(tmp), configs) as c:
            c.start_head(extra=["--grpc-port", str(free_port()), "--http-port", str(free_port())])
            c.start_scheduler("n1", num_cpus=8)
            cold = cold_start(c)
            c.cli("deploy", "auto")
            samples, requests = [], []
            t0, stop_sampling, stop_load = time.monotonic(), threading.Event(), threading.Event()
            threading.Thread(target=sample, args=(c, t0, stop_sampling, samples), daemon=True).start()
            time.sleep(IDLE_S)
            clients = [threading.Thread(target=client, args=(c, t0, stop_load, requests)) for _ in range(STREAMS)]
            for th in clients:
                th.start()
            time.sleep(LOAD_S)
            stop_load.set()
            for th in clients:
                th.join(120)
            end = time.monotonic() - t0
            wait_for(lambda: samples and samples[-1][1] == 0, TAIL_S + 60, "scale back to zero")
            back_at_zero = samples[-1][0] - end
            time.sleep(2)
            stop_sampling.set()
    plot(samples, requests, Path(args.out))
    first_from_zero = min(requests, key=lambda r: r[0])[2]
    print(json.dumps({"first_token_from_zero_s": round(first_from_zero, 2), "cold_start_deploy_to_first_token_s":
                      round(cold, 2), "peak_replicas": max(s[1] for s in samples), "requests": len(requests),
                      "failed": sum(1 for r in requests if r[1] != 200),
                      "zero_after_load_stopped_s": round(back_at_zero, 1), "plot": args.out}))


if __name__ == "__main__":
    main()
