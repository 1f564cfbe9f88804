"""The proxy's data plane against fake engines (`python bench/scale.py proxy`), and its load client.

Setup: one head (no proxy of its own), `gridserve simulate` serving R fake-engine replicas at
T tokens/s per stream, and one `gridserve proxy` process. For each level of concurrent streams a
client process (`python bench/proxyload.py client ...`) keeps that many native streaming requests open
through the proxy, and one direct gRPC stream per replica (a probe) beside them.

Latency the proxy adds per chunk: a fake engine emits one token for every row of a replica in the same
step, so a chunk's step reaches the probe (straight from the replica) and the proxied stream at the
same moment but for the proxy. For each proxied chunk, added = its arrival - the probe's latest arrival
from the same replica at or before it. Steps are 1/T apart, so this reads at most 1/T (100 ms at 10 tok/s):
beyond that it wraps, and such chunks also show as stalls. A stream stalls when two chunks are more than
1 s apart. Chunks/s per proxy core = chunks delivered / proxy CPU seconds.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proclib import HeadClient, Procs, cpu_seconds, load_average, percentile, rss_bytes, wait_for  # noqa: E402

from gridserve.v1 import head_pb2  # noqa: E402

STALL_S = 1.0


def catalog(root: Path, tps: float) -> Path:
    path = root / "model_configs.json"
    path.write_text(json.dumps({"default_model": "fakebench", "models": {"fakebench": {
        "description": "fake engine for the proxy benchmark",
        "source": {"type": "fake", "tokens_per_second": tps}, "context_length": 4096, "max_tokens_limit": 4000,
        "sampling": {"temperature": 0.0, "max_new_tokens": 64}, "resources": {"num_cpus": 0.1},
        "max_batch_size": 128, "max_waiting": 128}}}))
    return path


def proxy_bench(a) -> dict:
    root = Path(a.root or tempfile.mkdtemp(prefix="gridserve-proxy-"))
    state = root / "state"
    procs = Procs(root)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"tokens_per_second": a.tokens_per_second, "replicas": a.replicas, "proxies": a.proxies, "levels": []}
    try:
        head = procs.spawn("head", ["head", "--host", "127.0.0.1", "--grpc-port", str(a.grpc_port), "--no-proxy",
                                    "--state-dir", str(state), "--model-configs",
                                    str(catalog(root, a.tokens_per_second)), "--max-replicas", str(a.replicas),
                                    "--log-level", "WARNING"])
        from proclib import head_info
        info = wait_for(lambda: head.poll() is None and head_info(state, head.pid), 60, "head.json")
        address, token = info["grpc_address"], state / "cluster-token"
        client = HeadClient(address, token)
        nodes = max(1, a.replicas // 10)
        procs.spawn("simulate", ["simulate", "--head", address, "--nodes", str(nodes), "--cpus-per-node", "1",
                                 "--cluster-token-file", str(token)])
        wait_for(lambda: sum(n.alive for n in client.status().nodes) == nodes, 120, "nodes")
        client.deploy("fakebench", a.replicas)
        ready = head_pb2.REPLICA_STATE_READY
        wait_for(lambda: sum(r.state == ready for r in client.status().replicas) >= a.replicas, 180, "READY")
        ports, pids = [], []
        for i in range(a.proxies):
            port_file = root / f"proxy-{i}.port"
            proxy = procs.spawn(f"proxy-{i}", ["proxy", "--head", address, "--port", "0", "--port-file",
                                               str(port_file), "--cluster-token-file", str(token),
                                               "--log-level", "WARNING"])
            port = int(wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 60, "proxy port"))
            wait_for(lambda: _ready(port), 60, "proxy /ready")
            ports.append(port)
            pids.append(proxy.pid)
        replicas = {r.replica_id: r.address for r in client.status().replicas}
        (root / "replicas.json").write_text(json.dumps(replicas))
        for streams in [int(s) for s in a.streams.split(",")]:
            level = run_level(root, ports, token, streams, a, pids)
            result["levels"].append(level)
            print(json.dumps({k: v for k, v in level.items() if k != "added_ms_samples"}), flush=True)
        client.close()
    finally:
        procs.stop()
    samples = {lv["streams"]: lv.pop("added_ms_samples") for lv in result["levels"]}
    name = "scale-proxy" if a.proxies == 1 else f"scale-proxy-x{a.proxies}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot_proxy(out / f"{name}.png", result, samples)
    return result


def _ready(port: int) -> bool:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
        return r.status == 200


def run_level(root: Path, ports: list[int], token: Path, streams: int, a, proxy_pids: list[int]) -> dict:
    import subprocess
    res_file = root / f"client-{streams}.json"
    cmd = [sys.executable, str(Path(__file__)), "client", "--ports", ",".join(map(str, ports)),
           "--streams", str(streams),
           "--seconds", str(a.seconds), "--tps", str(a.tokens_per_second), "--replicas-file",
           str(root / "replicas.json"), "--token-file", str(token), "--result", str(res_file)]
    client = subprocess.Popen(cmd, stdout=open(root / f"client-{streams}.log", "wb"), stderr=subprocess.STDOUT)
    time.sleep(min(10.0, 2 + streams / 300))  # ramp: streams open, first chunks arrive
    cpu0, t0 = sum(map(cpu_seconds, proxy_pids)), time.monotonic()
    client.wait(a.seconds + 300)
    cpu = (sum(map(cpu_seconds, proxy_pids)) - cpu0) / (time.monotonic() - t0)
    level = json.loads(res_file.read_text())
    level.update(proxies=len(proxy_pids), proxy_cpu_cores=cpu,
                 proxy_rss_mb=sum(map(rss_bytes, proxy_pids)) / 2**20, load=load_average(),
                 chunks_per_proxy_core=level["chunks_per_s"] / cpu if cpu else None)
    return level


def plot_proxy(path: Path, result: dict, samples: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    levels = result["levels"]
    xs = [lv["streams"] for lv in levels]
    ax1.plot(xs, [lv["chunks_per_s"] for lv in levels], marker="o", label="chunks/s delivered")
    ax1.plot(xs, [lv["streams"] * result["tokens_per_second"] for lv in levels], ls="--", label="offered")
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("chunks/s")
    ax1.legend()
    ax1.set_title(f"{result['proxies']} proxy process(es), fake engines")
    for streams, vals in samples.items():
        s = sorted(vals)
        if s:
            ax2.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=f"{streams} streams")
    ax2.set_xlabel("latency the proxy adds per chunk (ms)")
    ax2.set_ylabel("fraction of chunks")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ---- the client process -------------------------------------------------------------------------

async def probe(address: str, token: str, arrivals: list[float], stop: asyncio.Event) -> None:
    """One direct gRPC stream to a replica, re-opened until stop: the arrival time of each engine step."""
    import grpc
    from gridserve.common.security import METADATA_KEY
    from gridserve.v1 import replica_pb2, replica_pb2_grpc
    async with grpc.aio.insecure_channel(address) as ch:
        stub = replica_pb2_grpc.ReplicaStub(ch)
        while not stop.is_set():
            req = replica_pb2.GenerateRequest(prompt="probe", params=replica_pb2.SamplingParams(max_tokens=3000))
            call = stub.Generate(req, metadata=((METADATA_KEY, token),))
            try:
                async for _ in call:
                    arrivals.append(time.monotonic())
                    if stop.is_set():
                        break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
            finally:
                call.cancel()


async def proxied(session, url: str, max_tokens: int, stop: asyncio.Event, out: dict) -> None:
    """Streams through the proxy, one request after another until stop; records (replica, arrivals)."""
    body = json.dumps({"prompt": "bench", "max_tokens": max_tokens})
    while not stop.is_set():
        times: list[float] = []
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                replica = resp.headers.get("X-Replica-Id", "")
                if resp.status != 200:
                    out["errors"] += 1
                    await asyncio.sleep(0.2)
                    continue
                async for _ in resp.content.iter_any():
                    times.append(time.monotonic())
                    if stop.is_set():
                        break
        except Exception:  # noqa: BLE001 - counted; the level goes on
            out["errors"] += 1
            await asyncio.sleep(0.2)
        out["streams"].append((replica, times))


async def client_main(args) -> None:
    import aiohttp
    replicas = json.loads(Path(args.replicas_file).read_text())
    token = Path(args.token_file).read_text().strip()
    stop = asyncio.Event()
    arrivals = {rid: [] for rid in replicas}
    out = {"errors": 0, "streams": []}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    urls = [f"http://127.0.0.1:{p}/v1/chat/fakebench" for p in args.ports.split(",")]
    max_tokens = int(args.tps * 20)  # 20 s streams, then a new request on the same slot
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        tasks = [asyncio.create_task(probe(addr, token, arrivals[rid], stop)) for rid, addr in replicas.items()]
        for i in range(args.streams):
            tasks.append(asyncio.create_task(proxied(session, urls[i % len(urls)], max_tokens, stop, out)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        ramp = min(10.0, 2 + args.streams / 300)
        await asyncio.sleep(ramp)
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        t1 = time.monotonic()
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        for t in tasks:
            t.cancel()
    Path(args.result).write_text(json.dumps(summarise(args, out, arrivals, t0, t1)))


def summarise(args, out: dict, arrivals: dict, t0: float, t1: float) -> dict:
    added, chunks, stalls, stalled_streams = [], 0, 0, 0
    probes = {rid: sorted(v) for rid, v in arrivals.items()}
    for replica, times in out["streams"]:
        inside = [t for t in times if t0 <= t <= t1]
        chunks += len(inside)
        gaps = [b - a for a, b in zip(times, times[1:]) if t0 <= b <= t1]
        n = sum(1 for g in gaps if g > STALL_S)
        stalls += n
        stalled_streams += 1 if n else 0
        p = probes.get(replica, [])
        for t in inside[1:]:
            i = bisect.bisect_right(p, t)
            if i:
                added.append((t - p[i - 1]) * 1000)
    return {"streams": args.streams, "seconds": t1 - t0, "chunks": chunks, "chunks_per_s": chunks / (t1 - t0),
            "offered_chunks_per_s": args.streams * args.tps, "errors": out["errors"], "stalls": stalls,
            "stalled_streams": stalled_streams, "added_ms_p50": percentile(added, 50),
            "added_ms_p99": percentile(added, 99), "added_ms_samples": added[:: max(1, len(added) // 5000)]}


def main() -> int:
    import argparse
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("client")
    c.add_argument("--ports", required=True, help="proxy ports, comma-separated: streams go round-robin")
    c.add_argument("--streams", type=int, required=True)
    c.add_argument("--seconds", type=float, required=True)
    c.add_argument("--tps", type=float, required=True)
    c.add_argument("--replicas-file", required=True)
    c.add_argument("--token-file", required=True)
    c.add_argument("--result", required=True)
    args = p.parse_args()
    asyncio.run(client_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
