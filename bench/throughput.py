"""Benchmark: SmolLM2 throughput and latency — offline float32 generate, gridserve through its proxy, a naive server.

One run measures, on this machine:
- the reference: offline float32 `model.generate` on a static batch of 1 and of 16 prompts (64 new
  tokens, greedy, min_new_tokens = max_new_tokens);
- gridserve end to end, as `make up` starts it: a head (with its proxy), one scheduler offering
  every core and one smollm2 replica with the model's own config (its dtype, resources and
  max_batch_size, raised only to the largest concurrency), driven over HTTP at each concurrency
  (every client sends one 64-token greedy chat request at once; concurrency 1 runs three times);
- long prompts: the worst gap between tokens of 4 running streams while a 2,000-token prompt
  arrives, in-process, with chunked prefill (as served) and with the whole prompt in one step;
- a naive server, same load: one thread per request calling `generate` with a TextIteratorStreamer;
- for comparison, transformers' own continuous batching (`generate_batch`) offline on 16 prompts.

For each load: aggregate tokens/s (tokens the server generated / wall time), time to first token
p50/p95/p99, inter-token latency p50/p95 (the gap between streamed chunks, spread over the tokens
the chunk carries), the server's peak RSS and the replica's prompt tokens from the prefix cache vs
prefilled. Prints a table and one JSON line, and writes the tables into docs/performance.md.
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


def load_smollm2(num_threads: int, dtype: str | None = "float32"):
    """smollm2 with dequantized float32 weights (the reference: dtype float32, quantization none), or with
    `dtype=None` as served (its config's dtype and quantization)."""
    import dataclasses

    import torch
    torch.set_num_threads(num_threads)
    from gridserve.common.model_config import load_model_catalog
    from gridserve.replica.settings import default_cache_dir
    from gridserve.replica.model_loader import load_model
    cfg = load_model_catalog().get("smollm2")
    return load_model(dataclasses.replace(cfg, dtype=dtype, quantization="none") if dtype else cfg, default_cache_dir())


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


def measure(system: str, url: str, payload, levels: list[int], generated, pid: int, count_tokens,
            prompt_tokens=lambda: (0, 0)) -> list[dict]:
    """One wave per concurrency level; `generated()` reads the server's own count of generated tokens."""
    asyncio.run(_wave(url, [payload("Say hello.", 8)]))  # warm-up
    rows = []
    for c in levels:
        before, streams, wall, cache_before = generated(), [], 0.0, prompt_tokens()
        with RssPeak(pid) as rss:
            for _ in range(REPEATS_AT_1 if c == 1 else 1):  # one stream is short and noisy: a few in a row
                more, seconds = asyncio.run(_wave(url, [payload(p, NEW_TOKENS) for p in prompts(c)]))
                streams, wall = streams + more, wall + seconds
        tokens = generated() - before
        cached, prefilled = (b - a for a, b in zip(cache_before, prompt_tokens()))
        ttft, itl = latencies(streams, count_tokens)
        rows.append({"system": system, "concurrency": c, "tokens": tokens, "seconds": round(wall, 2),
                     "tokens_per_s": round(tokens / wall, 1),
                     "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p95_s": round(percentile(ttft, 95), 3),
                     "ttft_p99_s": round(percentile(ttft, 99), 3),
                     "itl_p50_ms": round(1000 * percentile(itl, 50), 1),
                     "itl_p95_ms": round(1000 * percentile(itl, 95), 1), "peak_rss_mib": rss.peak // 2**20,
                     "prompt_tokens_cached": cached, "prompt_tokens_prefilled": prefilled})
        print(f"  {system} c={c}: {rows[-1]['tokens_per_s']} tokens/s", file=sys.stderr, flush=True)
    return rows


# ---- the two servers under test ---------------------------------------------------------------

def run_gridserve(root: Path, levels: list[int], cpus: int, count_tokens) -> list[dict]:
    """A real head + proxy + scheduler (offering `cpus` cores) + one smollm2 replica, measured over HTTP."""
    import grpc
    from support.cluster import Cluster
    from gridserve.v1 import replica_pb2, replica_pb2_grpc
    catalog = json.loads((REPO / "model_configs.json").read_text())
    entry = catalog["models"]["smollm2"]
    entry["max_batch_size"] = max(entry["max_batch_size"], max(levels))
    root.mkdir(parents=True, exist_ok=True)
    configs = root / "model_configs.json"
    configs.write_text(json.dumps({"default_model": "smollm2", "models": {"smollm2": entry}}))
    with Cluster(root, configs) as cluster:  # its logs go to stderr if anything fails
        cluster.start_head()
        cluster.start_scheduler("bench", num_cpus=cpus)
        cluster.cli("deploy", "smollm2", "--replicas", "1")
        replica = cluster.wait_ready("smollm2", 1, timeout=900)[0]
        with grpc.insecure_channel(replica.address) as ch:
            stub = replica_pb2_grpc.ReplicaStub(ch)
            info = lambda: stub.Info(replica_pb2.InfoRequest(), timeout=10, metadata=cluster.metadata)  # noqa: E731
            payload = lambda text, n: {"messages": [{"role": "user", "content": text}],  # noqa: E731
                                       "max_tokens": n, "temperature": 0}
            cache = lambda: (info().prompt_tokens_cached_total, info().prompt_tokens_prefilled_total)  # noqa: E731
            rows = measure("gridserve", cluster.url("/v1/chat/smollm2"), payload, levels,
                           lambda: info().tokens_generated_total, replica.pid, count_tokens, cache)
            print(f"  replica: {info().num_threads} torch threads, max_batch_size {info().max_batch_size}",
                  file=sys.stderr)
        return rows


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


# ---- long prompts arriving while streams run --------------------------------------------------

LONG_PROMPT_TOKENS = 2000


def long_prompt_gaps(threads: int, chunk: int | None) -> dict:
    """4 streams decode; a 2,000-token prompt arrives; the worst gap between their tokens meanwhile.
    In-process with the served model; `chunk` None is the whole prompt in one step (no chunking)."""
    from gridserve.replica.engine import Engine
    from gridserve.replica.request_params import SamplingOptions
    lm = load_smollm2(threads, dtype=None)
    engine = Engine(lm, num_threads=threads, max_batch_size=8)
    engine.runner.prefill_chunk = chunk or lm.config.context_length
    words = (REPO / "tests" / "data" / "english.txt").read_text().split()
    long_text = " ".join(words * 4)
    long_ids = lm.encode_prompt(long_text)[:LONG_PROMPT_TOKENS]
    engine.start()

    async def run() -> dict:
        gaps: list[float] = []
        arrived = asyncio.Event()
        done = asyncio.Event()

        async def stream(i: int) -> None:
            handle = engine.submit(f"s{i}", lm.encode_chat([("user", prompts(4)[i])]), SamplingOptions(max_tokens=400))
            last = None
            async for out in handle.outputs():
                now = time.perf_counter()
                if last is not None and arrived.is_set() and not done.is_set():
                    gaps.append(now - last)
                last = now
                if done.is_set():
                    handle.cancel()
                    return
        tasks = [asyncio.create_task(stream(i)) for i in range(4)]
        while engine.stats().tokens_generated_total < 40:
            await asyncio.sleep(0.01)
        arrived.set()
        t0 = time.perf_counter()
        async for _ in engine.submit("long", long_ids, SamplingOptions(max_tokens=1)).outputs():
            pass
        ttft = time.perf_counter() - t0
        await asyncio.sleep(0.3)
        done.set()
        await asyncio.gather(*tasks)
        return {"chunk": chunk or "whole prompt", "prompt_tokens": len(long_ids), "long_prompt_ttft_s": round(ttft, 2),
                "worst_gap_s": round(max(gaps), 3), "gap_p50_s": round(percentile(gaps, 50), 3)}
    try:
        return asyncio.run(run())
    finally:
        engine.stop()


# ---- report -----------------------------------------------------------------------------------

def ratios(ceiling: list[dict], rows: list[dict]) -> dict:
    """Issue 12's goals: c16 >= 1.8 x offline fp32 batch 16, c1 >= 2 x offline fp32 batch 1, TTFT at c16."""
    static = {r["batch"]: r["tokens_per_s"] for r in ceiling}
    at = {(r["system"], r["concurrency"]): r for r in rows}
    out = {}
    if ("gridserve", 16) in at:
        out["c16_over_fp32_static16"] = round(at["gridserve", 16]["tokens_per_s"] / static[16], 2)
        out["c16_ttft_p50_s"] = at["gridserve", 16]["ttft_p50_s"]
        out["c16_ttft_p99_s"] = at["gridserve", 16]["ttft_p99_s"]
        out["c16_peak_rss_mib"] = at["gridserve", 16]["peak_rss_mib"]
    if ("gridserve", 1) in at:
        out["c1_over_fp32_static1"] = round(at["gridserve", 1]["tokens_per_s"] / static[1], 2)
    if ("gridserve", 16) in at and ("naive", 16) in at:
        out["c16_over_naive16"] = round(at["gridserve", 16]["tokens_per_s"] / at["naive", 16]["tokens_per_s"], 2)
    return out


def markdown(result: dict) -> str:
    """The tables docs/performance.md shows, from one run."""
    lines = ["| offline float32 `model.generate` | batch | tokens/s |", "|---|---:|---:|"]
    lines += [f"| static | {r['batch']} | {r['tokens_per_s']} |" for r in result["static"]]
    lines += ["", "| server | concurrency | tokens/s | × fp32 static | TTFT p50 | TTFT p99 | ITL p50 | ITL p95 "
              "| peak RSS | prompt tokens cached / prefilled |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    static = {r["batch"]: r["tokens_per_s"] for r in result["static"]}
    for r in result["rows"]:
        ref = static.get(1 if r["concurrency"] == 1 else 16)
        ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref and r["concurrency"] in (1, 16) else ""
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['tokens_per_s']} | {ratio} | {r['ttft_p50_s']:.2f} s "
                     f"| {r['ttft_p99_s']:.2f} s | {r['itl_p50_ms']:.0f} ms | {r['itl_p95_ms']:.0f} ms "
                     f"| {r['peak_rss_mib']} MiB | {r.get('prompt_tokens_cached', 0)} / {r.get('prompt_tokens_prefilled', 0)} |")
    if result["long_prompt"]:
        lines += ["", "| 2,000-token prompt arrives, 4 streams running | prefill | worst gap | gap p50 | its first token |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| | {g['chunk']}{' tokens per step' if g['chunk'] != 'whole prompt' else ' in one step'} "
                  f"| {g['worst_gap_s']:.2f} s | {g['gap_p50_s']:.3f} s | {g['long_prompt_ttft_s']:.2f} s |"
                  for g in result["long_prompt"]]
    lines += ["", f"Run at load average {result['load_before']} (start) / {result['load_after']} (end) on "
              f"{result['cpus']} CPUs, {result['threads']} torch threads offline."]
    return "\n".join(lines)


def write_doc(table: str, path: Path = REPO / "docs" / "performance.md") -> None:
    """Put the tables between the bench markers of docs/performance.md (appended if the markers are missing)."""
    begin, end = "<!-- bench/throughput.py: begin -->", "<!-- bench/throughput.py: end -->"
    text = path.read_text()
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## Latest `make bench`\n\n{block}\n"
    path.write_text(text)


def print_report(result: dict) -> None:
    print(markdown(result))
    print("\n" + "  ".join(f"{k}={v}" for k, v in result["ratios"].items()))
    print(json.dumps(result))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,16", help="gridserve loads (default 1,16)")
    p.add_argument("--naive-concurrency", default="", help="naive server loads, e.g. 1,16 (default: none)")
    p.add_argument("--no-long-prompt", dest="long_prompt", action="store_false",
                   help="skip the long-prompt inter-token gap measurement")
    p.add_argument("--no-write-doc", dest="write_doc", action="store_false",
                   help="print only; do not write the tables into docs/performance.md")
    p.add_argument("--threads", type=int, default=psutil.cpu_count() or 1, help="torch threads (default: every CPU)")
    p.add_argument("--naive-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.naive_server:
        return naive_server(args.naive_server, args.threads)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    naive_levels = [int(c) for c in args.naive_concurrency.split(",") if c]
    load_before = round(os.getloadavg()[0], 1)
    lm = load_smollm2(args.threads)
    ceiling = [static_batch(lm, prompts(1), REPEATS_AT_1), static_batch(lm, prompts(16))]
    print(f"  static: {ceiling}", file=sys.stderr, flush=True)
    tokenizer = lm.tokenizer
    del lm  # the servers under test get the CPU and memory to themselves
    gc.collect()
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_gridserve(Path(tmp) / "gridserve", levels, args.threads, count_tokens) if levels else []
        rows += run_naive(Path(tmp), naive_levels, args.threads, count_tokens) if naive_levels else []
    from gridserve.replica.llama_runner import PREFILL_CHUNK
    long_prompt = [long_prompt_gaps(args.threads, chunk) for chunk in (PREFILL_CHUNK, None)] if args.long_prompt else []
    result = {"bench": "throughput", "model": "smollm2", "new_tokens": NEW_TOKENS, "threads": args.threads,
              "cpus": psutil.cpu_count(), "static": ceiling, "rows": rows, "long_prompt": long_prompt,
              "load_before": load_before, "load_after": round(os.getloadavg()[0], 1)}
    result["ratios"] = ratios(ceiling, rows)
    print_report(result)
    if args.write_doc:
        write_doc(markdown(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
