"""Benchmark: what one head and one proxy carry (issue 13), with plots.

`python bench/scale.py head` runs one real head against `gridserve simulate` (N simulated nodes whose
replicas are fake-engine replicas on real ports) and P real proxies watching its routes, and measures:
  - deploy of R replicas of the `fake` model: seconds until all are READY (and the ramp, plotted);
  - steady state: the head's CPU (cores) and RSS;
  - route changes (one replica removed / added, in turn): head `routes_changed` -> each proxy's
    `routes_applied` of that version or a newer one, p50/p99 over every (change, proxy); with --trace-routes
    also the head's share (change -> its write to each Watch stream, from the head's DEBUG `route_sent`);
    --routes-only skips the steady-state, status and restart figures;
  - `gridserve status --output json` and the table view: seconds and lines;
  - kill -9 of the head and a restart: seconds until every node is back, every replica READY, none
    duplicated or lost (the same replica ids as before the kill).
`python bench/scale.py proxy` measures the proxy's data plane against fake engines: for each number of
concurrent streams, chunks/s, the proxy's CPU (cores), and the latency the proxy adds per chunk (the
client's arrival time minus the replica's send time for the same chunk, both on this machine's clock),
with stalled streams counted (a gap of more than 1 s between chunks).
Figures go to OUT/scale-*.json and plots to OUT/*.png (matplotlib). The machine is shared: each result
records the load average next to it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proclib import (GRIDSERVE, HeadClient, Procs, cpu_seconds, head_info, load_average, log_events,  # noqa: E402
                     percentile, rss_bytes, wait_for)

from gridserve.v1 import head_pb2  # noqa: E402

READY = head_pb2.REPLICA_STATE_READY
REPO = Path(__file__).resolve().parent.parent


def start_head(procs: Procs, state: Path, grpc_port: int, max_replicas: int, name: str = "head",
               extra: list[str] = ()) -> dict:
    proc = procs.spawn(name, ["head", "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--no-proxy",
                              "--state-dir", str(state), "--model-configs", str(REPO / "model_configs.json"),
                              "--max-replicas", str(max_replicas), *extra])
    info = wait_for(lambda: proc.poll() is None and head_info(state, proc.pid), 60, "head.json")
    info["pid"] = proc.pid
    return info


def start_sims(procs: Procs, head: str, token: Path, nodes: int, cpus: float, sim_procs: int,
               extra: list[str] = ()) -> None:
    per = [nodes // sim_procs + (1 if i < nodes % sim_procs else 0) for i in range(sim_procs)]
    for i, n in enumerate(per):
        procs.spawn(f"simulate-{i}", ["simulate", "--head", head, "--nodes", str(n), "--cpus-per-node", str(cpus),
                                      "--node-prefix", f"sim{i}", "--cluster-token-file", str(token), *extra])


def start_proxies(procs: Procs, root: Path, head: str, token: Path, count: int,
                  extra: list[str] = ()) -> list[int]:
    ports = []
    for i in range(count):
        port_file = root / f"proxy-{i}.port"
        port_file.unlink(missing_ok=True)
        procs.spawn(f"proxy-{i}", ["proxy", "--head", head, "--port", "0", "--port-file", str(port_file),
                                   "--cluster-token-file", str(token), *extra])
        ports.append(port_file)
    return [int(wait_for(lambda p=p: p.exists() and p.read_text().strip(), 60, f"{p.name}")) for p in ports]


def sample_cpu(pid: int, seconds: float) -> float:
    a, t = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - a) / (time.monotonic() - t)


def timed_cli(head: str, state: Path, *args: str) -> tuple[float, str]:
    t = time.monotonic()
    proc = subprocess.run([GRIDSERVE, *args, "--head", head, "--state-dir", str(state)], capture_output=True,
                          text=True, timeout=120)
    return time.monotonic() - t, proc.stdout if proc.returncode == 0 else f"FAILED: {proc.stderr.strip()}"


def ready_ids(st: head_pb2.ClusterStatus) -> list[str]:
    return [r.replica_id for r in st.replicas if r.state == READY]


def route_propagation(root: Path, client: HeadClient, replicas: int, proxies: int, changes: int,
                      gap_s: float = 2.0) -> dict:
    """Alternately removes and adds one replica; each head routes_changed -> each proxy's first
    routes_applied with that version or newer (and, traced, -> the head's write of it to each proxy)."""
    before = max([int(f["version"]) for _, f in log_events(root / "head.log", "routes_changed")] or [0])
    for i in range(changes):
        client.scale("fake", replicas - 1 if i % 2 == 0 else replicas)
        time.sleep(gap_s)
    time.sleep(2.0)
    changed = [(t, int(f["version"])) for t, f in log_events(root / "head.log", "routes_changed")
               if int(f["version"]) > before]
    delays = []
    for p in range(proxies):
        applied = [(t, int(f["version"])) for t, f in log_events(root / f"proxy-{p}.log", "routes_applied")]
        for t_head, version in changed:
            later = [t for t, v in applied if v >= version and t >= t_head - 0.01]
            if later:
                delays.append(min(later) - t_head)
    # With --trace-routes the head logs each Watch send: change -> write done on the head's side, the rest of
    # a delay is the proxy's (its event loop getting to the message) and the socket between them.
    sent = [(int(f["after_change_ms"]) + int(f["write_ms"])) / 1000
            for _, f in log_events(root / "head.log", "route_sent")
            if int(f["version"]) > before and f["delta"] == "True"]  # a stream's first, whole table is no change
    return {"changes": len(changed), "samples": len(delays), "p50_s": percentile(delays, 50),
            "p99_s": percentile(delays, 99), "max_s": max(delays) if delays else None, "delays": delays,
            **({"head_sent_samples": len(sent), "head_sent_p50_s": percentile(sent, 50),
                "head_sent_p99_s": percentile(sent, 99), "head_sent_max_s": max(sent)} if sent else {})}


def restart_head(procs: Procs, root: Path, state: Path, port: int, max_replicas: int, nodes: int,
                 replicas: int, before: set[str], extra: list[str] = ()) -> dict:
    procs.kill("head")
    t0 = time.monotonic()
    info = start_head(procs, state, port, max_replicas, name="head", extra=extra)
    client = HeadClient(info["grpc_address"], state / "cluster-token")
    seen = {}

    def back():
        st = client.status()
        ids = [r.replica_id for r in st.replicas]
        seen.update(alive=sum(n.alive for n in st.nodes), replicas=len(ids), unique=len(set(ids)),
                    ready=len(ready_ids(st)), same_ids=set(ids) == before)
        return seen["alive"] == nodes and seen["ready"] == replicas and seen["unique"] == replicas
    ok = True
    try:
        wait_for(back, 180, "all nodes and replicas back after the head restart", interval=1.0)
    except SystemExit:
        ok = False  # recorded with what was seen last
    finally:
        client.close()
    return {"ok": ok, "seconds": time.monotonic() - t0, **seen}


def steady_and_restart(a, result: dict, procs: Procs, root: Path, state: Path, client: HeadClient, head: str,
                       head_pid: int, extra: list[str]) -> None:
    """Steady-state CPU and RSS, status timings, route propagation, then a kill -9 of the head and a restart."""
    result["steady_head_cpu_cores"] = sample_cpu(head_pid, 30)
    result["head_rss_mb"] = rss_bytes(head_pid) / 2**20
    result["load_steady"] = load_average()
    json_s = [timed_cli(head, state, "status", "--output", "json")[0] for _ in range(5)]
    table_s, table = timed_cli(head, state, "status")
    result["status_json_s"] = {"p50": percentile(json_s, 50), "max": max(json_s)}
    result["status_table"] = {"seconds": table_s, "lines": len(table.splitlines()),
                              **({"error": table} if table.startswith("FAILED") else {})}
    result["routes"] = route_propagation(root, client, a.replicas, a.proxies, a.changes, a.change_gap)
    result["load_routes"] = load_average()
    before = {r.replica_id for r in client.status().replicas}
    client.close()
    result["restart"] = restart_head(procs, root, state, a.grpc_port, a.replicas, a.nodes, a.replicas, before,
                                     extra)
    result["load_end"] = load_average()


def head_bench(a) -> dict:
    root = Path(a.root or tempfile.mkdtemp(prefix="gridserve-scale-"))
    state = root / "state"
    procs = Procs(root)
    result: dict = {"nodes": a.nodes, "replicas": a.replicas, "proxies": a.proxies, "node_timeout": a.node_timeout,
                    "served": not a.no_serve,
                    "report_interval": a.report_interval, "load_start": load_average()}
    timeline: list[tuple[float, float, int, int]] = []  # (t, head cpu cores, rss, ready)
    ramp: list[float] = []  # seconds after the deploy of each replica's READY
    try:
        extra = ["--node-timeout", str(a.node_timeout), *(["--log-level", "DEBUG"] if a.trace_routes else [])]
        info = start_head(procs, state, a.grpc_port, a.replicas, extra=extra)
        head, token, head_pid = info["grpc_address"], state / "cluster-token", info["pid"]
        client = HeadClient(head, token)
        start_sims(procs, head, token, a.nodes, a.cpus_per_node, a.sim_procs,
                   ["--report-interval", str(a.report_interval), *(["--no-serve"] if a.no_serve else [])])
        wait_for(lambda: sum(n.alive for n in client.status().nodes) == a.nodes, 300, f"{a.nodes} nodes", 1.0)
        interval = a.proxy_metrics_interval if a.proxy_metrics_interval is not None else 300 if a.no_serve else 0
        result["proxy_metrics_interval"] = interval or "default"
        start_proxies(procs, root, head, token, a.proxies, ["--metrics-interval", str(interval)] if interval else [])
        result["idle_head_cpu_cores"] = sample_cpu(head_pid, 2 if a.routes_only else 10)
        t0, deployed_at = time.monotonic(), time.time()
        client.deploy("fake", a.replicas)
        cpu0, last = cpu_seconds(head_pid), time.monotonic()
        while True:
            st = client.status()
            ready = st.deployments[0].ready if st.deployments else 0
            now = time.monotonic()
            cpu1 = cpu_seconds(head_pid)
            timeline.append((now - t0, (cpu1 - cpu0) / max(1e-3, now - last), rss_bytes(head_pid), ready))
            cpu0, last = cpu1, now
            if ready >= a.replicas or now - t0 > 300:
                break
            time.sleep(2.0)  # a status of 10,000 replicas is itself work for the head: poll gently
        result["deploy_ready_s"] = time.monotonic() - t0
        result["ready"] = ready
        ramp = sorted(t - deployed_at for t, f in log_events(root / "head.log", "replica_state")
                      if f.get("state") == "READY" and t >= deployed_at)
        time.sleep(a.settle)
        if a.routes_only:
            result["routes"] = route_propagation(root, client, a.replicas, a.proxies, a.changes, a.change_gap)
            result["load_routes"] = load_average()
        else:
            steady_and_restart(a, result, procs, root, state, client, head, head_pid, extra)
    finally:
        procs.stop()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    delays = result.get("routes", {}).pop("delays", [])
    (out / "scale-head.json").write_text(json.dumps(result, indent=2))
    plot_head(out, timeline, ramp, delays, result)
    return result


def plot_head(out: Path, timeline, ramp, delays, result) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if ramp:
        ax1.plot(ramp, range(1, len(ramp) + 1), label="READY replicas (head log)")
        ax1.set_xlabel("seconds since deploy")
        ax1.set_ylabel("READY replicas")
    if timeline:
        axc = ax1.twinx()
        axc.plot([x[0] for x in timeline], [x[1] for x in timeline], color="tab:red", alpha=0.6, marker=".")
        axc.set_ylabel("head CPU (cores), red")
        ax1.set_title(f"deploy fake x{result['replicas']} on {result['nodes']} nodes")
    if delays:
        s = sorted(delays)
        ax2.plot([d * 1000 for d in s], [(i + 1) / len(s) for i in range(len(s))])
        ax2.set_xlabel("route change -> proxy table (ms)")
        ax2.set_ylabel("fraction")
        ax2.set_title(f"route propagation, {result['proxies']} proxies")
    fig.tight_layout()
    fig.savefig(out / "scale-head.png", dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    h = sub.add_parser("head", help="one head: deploy, steady state, route propagation, status, restart")
    h.add_argument("--nodes", type=int, default=1000)
    h.add_argument("--cpus-per-node", type=float, default=1.0, help="the fake model takes 0.1 CPU: 10 per node")
    h.add_argument("--replicas", type=int, default=10000)
    h.add_argument("--proxies", type=int, default=10)
    h.add_argument("--changes", type=int, default=10, help="route changes to time")
    h.add_argument("--sim-procs", type=int, default=2, help="simulate processes sharing the nodes")
    h.add_argument("--grpc-port", type=int, default=50951)
    h.add_argument("--node-timeout", type=float, default=10.0, help="the head's --node-timeout")
    h.add_argument("--no-serve", action="store_true",
                   help="simulated replicas bind no port (the simulation's own cost out of the head's figures)")
    h.add_argument("--report-interval", type=float, default=1.0, help="each simulated node's heartbeat")
    h.add_argument("--change-gap", type=float, default=2.0, help="seconds between timed route changes")
    h.add_argument("--routes-only", action="store_true",
                   help="after the deploy, time only the route changes (no steady-state CPU, status or restart)")
    h.add_argument("--settle", type=float, default=5.0, help="seconds from all READY to the steady-state figures")
    h.add_argument("--proxy-metrics-interval", type=float, default=None,
                   help="the proxies' --metrics-interval (0: their default; with --no-serve 300 unless given). Each "
                        "poll asks up to 256 replicas for Info over a channel the proxy then keeps; with --no-serve no "
                        "replica answers, and each such channel retries its DNS and connect in grpc's threads for as "
                        "long as the replica is routed: thousands of them starve the machine (docs/scale.md)")
    h.add_argument("--trace-routes", action="store_true",
                   help="the head logs each Watch send (route_sent, DEBUG): change -> send -> proxy, decomposed")
    h.add_argument("--root", default="", help="scratch folder (default: a new temp dir)")
    h.add_argument("--out", default=str(REPO / "docs" / "scale"))
    x = sub.add_parser("proxy", help="one proxy's data plane against fake engines")
    x.add_argument("--streams", default="100,1000,2000")
    x.add_argument("--tokens-per-second", type=float, default=10.0)
    x.add_argument("--seconds", type=float, default=20.0, help="measured seconds per level")
    x.add_argument("--replicas", type=int, default=100)
    x.add_argument("--grpc-port", type=int, default=50961)
    x.add_argument("--proxies", type=int, default=1, help="proxy processes sharing the streams round-robin")
    x.add_argument("--root", default="")
    x.add_argument("--out", default=str(REPO / "docs" / "scale"))
    a = p.parse_args()
    if a.what == "head":
        result = head_bench(a)
    else:
        from proxyload import proxy_bench
        result = proxy_bench(a)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
