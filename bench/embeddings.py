"""Benchmark: all-MiniLM-L6-v2 embeddings — sentences/s through gridserve at 1 and 32 clients, against an offline batched forward.

One run measures, on this machine:
- the ceiling: the same encoder loaded in this process, one forward (mean pooling + L2) over a batch
  of 1 and of 32 sentences, repeated;
- gridserve end to end: a head (with its proxy), one scheduler and one minilm replica on every core
  (resources.num_cpus = the CPU count), driven over HTTP by N clients, each sending one-sentence
  POST /v1/embeddings requests one after another for a fixed time.

For each load: sentences/s, request latency p50/p95, and the forward passes the replica ran with
their mean rows (from its Info). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Cluster helper that runs real gridserve processes
MODEL = "minilm"
WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings on the old stone wall near "
         "the river where children play every summer afternoon").split()


def sentence(i: int) -> str:
    """A different sentence of 8-20 words for every i (about 10-25 tokens)."""
    n = 8 + i % 13
    return f"Sentence {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)) + "."


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


# ---- the ceiling: offline batched forwards ----------------------------------------------------

def offline(threads: int, batches: list[int], seconds: float) -> list[dict]:
    """Sentences/s of the encoder's forward (tokenize + forward + pooling) in this process, per batch size."""
    import torch
    torch.set_num_threads(threads)
    from gridserve.common.model_config import load_model_catalog
    from gridserve.replica.embedding_model import load_embedder
    lm = load_embedder(load_model_catalog().get(MODEL))
    rows = []
    for b in batches:
        texts = [sentence(i) for i in range(b)]
        lm.embed(lm.encode(texts))  # warm-up
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            lm.embed(lm.encode(texts))
            done += b
        wall = time.perf_counter() - t0
        rows.append({"batch": b, "sentences": done, "seconds": round(wall, 2),
                     "sentences_per_s": round(done / wall, 1)})
        print(f"  offline batch {b}: {rows[-1]['sentences_per_s']} sentences/s", file=sys.stderr, flush=True)
    del lm
    gc.collect()
    return rows


# ---- gridserve: N clients, each one request after another -------------------------------------

async def _client(session, url: str, first: int, stride: int, until: float, latencies: list[float]) -> None:
    i = first
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        async with session.post(url, json={"model": MODEL, "input": sentence(i), "encoding_format": "base64"}) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"{url} answered {r.status}: {body[:300]!r}")
        latencies.append(time.perf_counter() - t0)
        i += stride


async def _load(url: str, clients: int, seconds: float) -> tuple[list[float], float]:
    import aiohttp
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(session, url, c, clients, t0 + seconds, latencies) for c in range(clients)))
        return latencies, time.perf_counter() - t0


def run_gridserve(root: Path, levels: list[int], cpus: int, seconds: float) -> list[dict]:
    """A real head + proxy + scheduler + one minilm replica on `cpus` cores, measured over HTTP."""
    import grpc
    from support.cluster import Cluster
    from gridserve.v1 import replica_pb2, replica_pb2_grpc
    entry = json.loads((REPO / "model_configs.json").read_text())["models"][MODEL]
    entry["resources"]["num_cpus"] = cpus
    root.mkdir(parents=True, exist_ok=True)
    configs = root / "model_configs.json"
    configs.write_text(json.dumps({"default_model": MODEL, "models": {MODEL: entry}}))
    with Cluster(root, configs) as cluster:  # its logs go to stderr if anything fails
        cluster.start_head()
        cluster.start_scheduler("bench", num_cpus=cpus)
        cluster.cli("deploy", MODEL, "--replicas", "1")
        replica = cluster.wait_ready(MODEL, 1, timeout=300)[0]
        url = cluster.url("/v1/embeddings")
        with grpc.insecure_channel(replica.address) as ch:
            stub = replica_pb2_grpc.ReplicaStub(ch)
            info = lambda: stub.Info(replica_pb2.InfoRequest(), timeout=10, metadata=cluster.metadata)  # noqa: E731
            asyncio.run(_load(url, 4, 1.0))  # warm-up
            rows = []
            for c in levels:
                before = info().steps_total
                latencies, wall = asyncio.run(_load(url, c, seconds))
                passes = info().steps_total - before
                rows.append({"system": "gridserve", "clients": c, "sentences": len(latencies),
                             "seconds": round(wall, 2), "sentences_per_s": round(len(latencies) / wall, 1),
                             "latency_p50_ms": round(1000 * percentile(latencies, 50), 1),
                             "latency_p95_ms": round(1000 * percentile(latencies, 95), 1),
                             "forward_passes": passes, "rows_per_pass": round(len(latencies) / max(1, passes), 1)})
                print(f"  gridserve c={c}: {rows[-1]['sentences_per_s']} sentences/s", file=sys.stderr, flush=True)
        return rows


def print_report(result: dict) -> None:
    print(f"{'offline forward':18} {'batch':>5} {'sent/s':>8}")
    for r in result["offline"]:
        print(f"{'':18} {r['batch']:>5} {r['sentences_per_s']:>8}")
    print(f"\n{'system':10} {'clients':>7} {'sent/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'passes':>7} {'rows/pass':>9}")
    for r in result["rows"]:
        print(f"{r['system']:10} {r['clients']:>7} {r['sentences_per_s']:>8} {r['latency_p50_ms']:>8} "
              f"{r['latency_p95_ms']:>8} {r['forward_passes']:>7} {r['rows_per_pass']:>9}")
    print("\n" + "  ".join(f"{k}={v}" for k, v in result["ratios"].items()))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/embeddings.py", description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,32", help="gridserve loads: concurrent clients (default 1,32)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each load runs (default 10)")
    p.add_argument("--threads", type=int, default=psutil.cpu_count() or 1, help="torch threads (default: every CPU)")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",") if c]
    ceiling = offline(args.threads, [1, 32], args.seconds / 2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_gridserve(Path(tmp) / "gridserve", levels, args.threads, args.seconds)
    static = {r["batch"]: r["sentences_per_s"] for r in ceiling}
    ratios = {f"c{r['clients']}_over_offline_batch{b}": round(r["sentences_per_s"] / static[b], 2)
              for r in rows for b in ((1,) if r["clients"] == 1 else (32,))}
    print_report({"bench": "embeddings", "model": MODEL, "threads": args.threads, "cpus": psutil.cpu_count(),
                  "load_avg_1m": round(os.getloadavg()[0], 2), "offline": ceiling, "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
