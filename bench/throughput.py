"""Benchmark: SmolLM2 throughput and latency — static-batch ceiling, gridserve through its proxy, a naive server.

One run measures, on this machine:
- the ceiling: offline `model.generate` on a static batch of 1 and of 16 prompts (64 new tokens,
  greedy, min_new_tokens = max_new_tokens);
- gridserve end to end: a head (with its proxy), one scheduler and one smollm2 replica on every
  core (resources.num_cpus = the CPU count, max_batch_size >= 32), driven over HTTP at each
  concurrency (every client sends one 64-token greedy request at once; concurrency 1 and batch 1
  run three times back to back);
- a naive server, same load: one thread per request calling `generate` with a TextIteratorStreamer;
- for comparison, transformers' own continuous batching (`generate_batch`) offline on 16 prompts.

For each load: aggregate tokens/s (tokens the server generated / wall time), time to first token
p50/p95, inter-token latency p50/p95 (the gap between streamed chunks, spread over the tokens the
chunk carries) and the server's peak RSS. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import codecs
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Cluster helper that runs real gridserve processes
NEW_TOKENS = 64
REPEATS_AT_1 = 3  # batch 1 and concurrency 1 run this many times back to back (one run is ~5 s)
TOPICS = ["the moon", "volcanoes", "a lighthouse keeper", "bread baking", "the ocean floor", "honey bees",
          "a desert town", "the first computers", "mountain goats", "a jazz club", "winter in Norway",
          "a lost kitten", "the Roman roads", "coral reefs", "a night train", "paper airplanes",
          "the northern lights", "an old library", "chess openings", "rain forests", "a robot gardener",
          "ice skating", "the silk road", "thunderstorms", "a tiny island", "clock makers", "wild horses",
          "a space station", "tea ceremonies", "glaciers", "a street market", "sunflowers"]


def prompts(n: int) -> list[str]:
    return [f"Tell me a story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def load_smollm2(num_threads: int):
    import torch
    torch.set_num_threads(num_threads)
    from gridserve.common.model_config import load_model_catalog
    from gridserve.replica.settings import default_cache_dir
    from gridserve.replica.model_loader import load_model
    return load_model(load_model_catalog().get("smollm2"), default_cache_dir())


# ---- the ceiling: offline static batches ------------------------------------------------------

def static_batch(lm, texts: list[str], repeats: int = 1) -> dict:
    """model.generate over a left-padded batch, `repeats` times; tokens/s counting NEW_TOKENS per row."""
    import torch
    lm.tokenizer.padding_side = "left"
    rendered = [lm.render_chat([("user", t)])[0] for t in texts]
    enc = lm.tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        lm.model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = lm.model.generate(**enc, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            seconds += time.perf_counter() - t0
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(texts)
    return {"batch": len(texts), "runs": repeats, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def transformers_generate_batch(lm, texts: list[str]) -> dict:
    """transformers' own continuous batching (`generate_batch`) on the same prompts, timed on a second call."""
    import torch
    from transformers import GenerationConfig
    ids = [lm.encode_chat([("user", t)]) for t in texts]
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1,  # never stops early
                           pad_token_id=lm.tokenizer.pad_token_id or 0)
    with torch.inference_mode():
        lm.model.generate_batch(inputs=ids, generation_config=cfg)  # warm-up, sizes its cache
        t0 = time.perf_counter()
        results = lm.model.generate_batch(inputs=ids, generation_config=cfg, warmup=False)
        seconds = time.perf_counter() - t0
    tokens = sum(len(r.generated_tokens) for r in results.values())
    return {"batch": len(texts), "runs": 1, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "engine": "transformers generate_batch"}


# ---- the naive server: one thread per request, generate + TextIteratorStreamer ----------------

def naive_server(port_file: str, num_threads: int) -> None:
    """Serve POST /generate {"prompt", "max_tokens"} as streamed text; GET /stats the tokens generated."""
    from transformers import TextIteratorStreamer
    lm = load_smollm2(num_threads)
    counter = {"tokens": 0}
    lock = threading.Lock()

    def generate(ids, streamer, n):
        out = lm.model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=n, do_sample=False,
                                streamer=streamer)
        with lock:
            counter["tokens"] += out.shape[1] - ids.shape[1]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def do_GET(self):
            self._send(json.dumps(counter).encode())

        def do_POST(self):
            import torch
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = torch.tensor([lm.encode_chat([("user", body["prompt"])])])
            streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
            threading.Thread(target=generate, args=(ids, streamer, body["max_tokens"]), daemon=True).start()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.end_headers()
            for text in streamer:
                self.wfile.write(text.encode())
                self.wfile.flush()

        def _send(self, data: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


# ---- load: every client sends one request at once, chunks are timed as they arrive ------------

async def _one(session, url: str, payload: dict) -> list[tuple[float, str]]:
    """(arrival time, text) of every chunk of one streamed reply; the start time first, with ""."""
    stamps = [(time.perf_counter(), "")]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    async with session.post(url, json=payload) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:300]}")
        async for data in resp.content.iter_any():
            stamps.append((time.perf_counter(), decoder.decode(data)))
    return stamps


async def _wave(url: str, payloads: list[dict]) -> tuple[list, float]:
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(_one(session, url, p) for p in payloads))
        return streams, time.perf_counter() - t0


def latencies(streams: list, count_tokens) -> tuple[list[float], list[float]]:
    """TTFT per request, and inter-token gaps: a chunk's gap spread evenly over the tokens it carries."""
    ttft, itl = [], []
    for stamps in streams:
        ttft.append(stamps[1][0] - stamps[0][0])
        for (prev, _), (t, text) in zip(stamps[1:], stamps[2:]):
            k = max(1, count_tokens(text))
            itl += [(t - prev) / k] * k
    return ttft, itl


class RssPeak:
    """Polls a process's RSS every 50 ms while in the `with` block; `peak` is the largest seen, in bytes."""

    def __init__(self, pid: int):
        self.proc, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(system: str, url: str, payload, levels: list[int], generated, pid: int, count_tokens) -> list[dict]:
    """One wave per concurrency level; `generated()` reads the server's own count of generated tokens."""
    asyncio.run(_wave(url, [payload("Say hello.", 8)]))  # warm-up
    rows = []
    for c in levels:
        before, streams, wall = generated(), [], 0.0
        with RssPeak(pid) as rss:
            for _ in range(REPEATS_AT_1 if c == 1 else 1):  # one stream is short and noisy: a few in a row
                more, seconds = asyncio.run(_wave(url, [payload(p, NEW_TOKENS) for p in prompts(c)]))
                streams, wall = streams + more, wall + seconds
        tokens = generated() - before
        ttft, itl = latencies(streams, count_tokens)
        rows.append({"system": system, "concurrency": c, "tokens": tokens, "seconds": round(wall, 2),
                     "tokens_per_s": round(tokens / wall, 1),
                     "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p95_s": round(percentile(ttft, 95), 3),
                     "itl_p50_ms": round(1000 * percentile(itl, 50), 1),
                     "itl_p95_ms": round(1000 * percentile(itl, 95), 1), "peak_rss_mib": rss.peak // 2**20})
        print(f"  {system} c={c}: {rows[-1]['tokens_per_s']} tokens/s", file=sys.stderr, flush=True)
    return rows


# ---- the two servers under test ---------------------------------------------------------------

def run_gridserve(root: Path, levels: list[int], cpus: int, count_tokens) -> list[dict]:
    """A real head + proxy + scheduler + one smollm2 replica on `cpus` cores, measured over HTTP."""
    import grpc
    from support.cluster import Cluster
    from gridserve.v1 import replica_pb2, replica_pb2_grpc
    catalog = json.loads((REPO / "model_configs.json").read_text())
    entry = catalog["models"]["smollm2"]
    entry["resources"]["num_cpus"] = cpus
    entry["max_batch_size"], entry["max_waiting"] = max(32, max(levels)), 64
    root.mkdir(parents=True, exist_ok=True)
    configs = root / "model_configs.json"
    configs.write_text(json.dumps({"default_model": "smollm2", "models": {"smollm2": entry}}))
    cluster = Cluster(root, configs)
    try:
        cluster.start_head()
        cluster.start_scheduler("bench", num_cpus=cpus)
        cluster.cli("deploy", "smollm2", "--replicas", "1")
        replica = cluster.wait_ready("smollm2", 1, timeout=900)[0]
        with grpc.insecure_channel(replica.address) as ch:
            stub = replica_pb2_grpc.ReplicaStub(ch)
            info = lambda: stub.Info(replica_pb2.InfoRequest(), timeout=10, metadata=cluster.metadata)  # noqa: E731
            payload = lambda text, n: {"messages": [{"role": "user", "content": text}],  # noqa: E731
                                       "max_tokens": n, "temperature": 0}
            rows = measure("gridserve", cluster.url("/v1/chat/smollm2"), payload, levels,
                           lambda: info().tokens_generated_total, replica.pid, count_tokens)
            print(f"  replica: {info().num_threads} torch threads, max_batch_size {info().max_batch_size}",
                  file=sys.stderr)
        return rows
    except BaseException:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.stop()


def run_naive(root: Path, levels: list[int], cpus: int, count_tokens) -> list[dict]:
    import urllib.request
    port_file = root / "naive.port"
    proc = subprocess.Popen([sys.executable, __file__, "--naive-server", str(port_file), "--threads", str(cpus)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 600
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the naive server did not start")
            time.sleep(0.2)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        generated = lambda: json.loads(urllib.request.urlopen(f"{base}/stats").read())["tokens"]  # noqa: E731
        payload = lambda text, n: {"prompt": text, "max_tokens": n}  # noqa: E731
        return measure("naive", f"{base}/generate", payload, levels, generated, proc.pid, count_tokens)
    finally:
        proc.terminate()
        proc.wait(30)


# ---- report -----------------------------------------------------------------------------------

def ratios(ceiling: list[dict], rows: list[dict]) -> dict:
    """The issue's goals: c16 >= 0.8 x static 16 and >= 4 x naive, c1 >= 0.9 x static 1, TTFT under naive's."""
    static = {r["batch"]: r["tokens_per_s"] for r in ceiling}
    at = {(r["system"], r["concurrency"]): r for r in rows}
    out = {}
    if ("gridserve", 16) in at:
        out["c16_over_static16"] = round(at["gridserve", 16]["tokens_per_s"] / static[16], 2)
    if ("gridserve", 16) in at and ("naive", 16) in at:
        out["c16_over_naive16"] = round(at["gridserve", 16]["tokens_per_s"] / at["naive", 16]["tokens_per_s"], 2)
        out["c16_ttft_p50_below_naive"] = at["gridserve", 16]["ttft_p50_s"] < at["naive", 16]["ttft_p50_s"]
    if ("gridserve", 1) in at:
        out["c1_over_static1"] = round(at["gridserve", 1]["tokens_per_s"] / static[1], 2)
    for c in (4, 32):
        if ("gridserve", c) in at and ("naive", c) in at:
            out[f"c{c}_over_naive{c}"] = round(at["gridserve", c]["tokens_per_s"] / at["naive", c]["tokens_per_s"], 2)
    return out


def print_report(ceiling: list[dict], rows: list[dict], result: dict) -> None:
    print(f"{'offline':28} {'batch':>5} {'tok/s':>8}")
    for r in ceiling:
        print(f"{'static model.generate':28} {r['batch']:>5} {r['tokens_per_s']:>8}")
    for r in result["generate_batch"]:
        print(f"{'transformers generate_batch':28} {r['batch']:>5} {r['tokens_per_s']:>8}")
    print(f"\n{'system':10} {'conc':>5} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} "
          f"{'ITL p95':>8} {'RSS MiB':>8}")
    for r in rows:
        print(f"{r['system']:10} {r['concurrency']:>5} {r['tokens_per_s']:>8} {r['ttft_p50_s']:>8}s "
              f"{r['ttft_p95_s']:>8}s {r['itl_p50_ms']:>6}ms {r['itl_p95_ms']:>6}ms {r['peak_rss_mib']:>8}")
    print("\n" + "  ".join(f"{k}={v}" for k, v in result["ratios"].items()))
    print(json.dumps(result))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,4,16,32", help="gridserve loads (default 1,4,16,32)")
    p.add_argument("--naive-concurrency", default="1,4,16,32", help="naive server loads (default 1,4,16,32)")
    p.add_argument("--no-generate-batch", dest="generate_batch", action="store_false",
                   help="skip timing transformers' own continuous batching (generate_batch) offline")
    p.add_argument("--threads", type=int, default=psutil.cpu_count() or 1, help="torch threads (default: every CPU)")
    p.add_argument("--naive-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.naive_server:
        return naive_server(args.naive_server, args.threads)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    naive_levels = [int(c) for c in args.naive_concurrency.split(",") if c]
    lm = load_smollm2(args.threads)
    ceiling = [static_batch(lm, prompts(1), REPEATS_AT_1), static_batch(lm, prompts(16))]
    print(f"  static: {ceiling}", file=sys.stderr, flush=True)
    offline = [transformers_generate_batch(lm, prompts(16))] if args.generate_batch else []
    tokenizer = lm.tokenizer
    del lm  # the servers under test get the CPU and memory to themselves
    gc.collect()
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_gridserve(Path(tmp) / "gridserve", levels, args.threads, count_tokens) if levels else []
        rows += run_naive(Path(tmp), naive_levels, args.threads, count_tokens) if naive_levels else []
    result = {"bench": "throughput", "model": "smollm2", "new_tokens": NEW_TOKENS, "threads": args.threads,
              "cpus": psutil.cpu_count(), "static": ceiling, "generate_batch": offline, "rows": rows}
    result["ratios"] = ratios(ceiling, rows)
    if offline:
        cb, static16 = offline[0]["tokens_per_s"], ceiling[1]["tokens_per_s"]
        result["ratios"]["generate_batch16_over_static16"] = round(cb / static16, 2)
    print_report(ceiling, rows, result)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
