"""Benchmark: the engines' prefix-cache hit rate on a multi-turn chat workload over two replicas, with the
proxy's cache-aware routing (`--routing prefix`) against the power of two choices alone (`--routing p2c`).

Starts a head without its proxy and one scheduler on 127.0.0.1. For each routing in turn it starts a proxy
with that `--routing`, deploys the model with 2 replicas (fresh engines, empty caches), warms both up, and
runs the same workload: CONVERSATIONS chats sharing a system prompt, each TURNS turns long, CONCURRENCY of
them at a time; every turn resends the whole history plus a new user message (OpenAI chat, streamed, short
max_tokens, greedy) after the answer and a pause (the user reading and typing: uniform in 0..2 x --think
seconds, seeded, the same for both routings). Then it reads the replicas' prompt-token
counters from the proxy's /metrics (`gridserve_replica_prompt_tokens_cached_total`,
`..._prefilled_total`), undeploys and stops the proxy.

Prints a table (hit rate = cached / (cached + prefilled) prompt tokens summed over both replicas, time to
first token p50/p99, requests, failures, replicas per conversation) and one JSON line.

    .venv/bin/python bench/prefix_routing.py                 # SmolLM2, for the record
    .venv/bin/python bench/prefix_routing.py --model tiny    # the tiny random-weight test model: a quick run
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from proclib import load_average, percentile  # noqa: E402
from support.cluster import Cluster  # noqa: E402
from support.waiting import wait_for  # noqa: E402

SYSTEM = ("You are a patient tutor for a class on the history of computing. Answer in two or three short "
          "sentences, name the people and machines involved, and give years where you know them. If a "
          "question is unclear, say what you understood before answering.")
TOPICS = ["the ENIAC", "Ada Lovelace", "the transistor", "UNIX", "the Apollo guidance computer", "ARPANET",
          "punched cards", "COBOL", "the IBM 360", "the Xerox Alto", "the World Wide Web", "Colossus",
          "the first compilers", "magnetic core memory", "the microprocessor", "time-sharing"]
FOLLOW_UPS = ["Who were the key people behind it?", "What came right before it?", "Why did it matter so much?",
              "What replaced it later on?", "Can you give one surprising detail about it?",
              "How big and how expensive was it?", "Where can I see one today?"]
ROUTINGS = ("prefix", "p2c")


def model_configs(model: str, root: Path) -> Path:
    """A catalog with `model` alone: SmolLM2's own entry, or the tiny test model built under `root`."""
    if model == "tiny":
        from support.tiny_model import build_tiny_model
        entry = {"source": {"type": "local", "path": str(build_tiny_model(root / "tiny-model"))},
                 "context_length": 1024, "max_tokens_limit": 128, "sampling": {"max_new_tokens": 32},
                 "resources": {"num_cpus": 1},
                 "max_batch_size": 8, "max_waiting": 64}
    else:
        entry = json.loads((ROOT / "model_configs.json").read_text())["models"][model]
    path = root / "model_configs.json"
    path.write_text(json.dumps({"default_model": model, "models": {model: entry}}))
    return path


class Proxy:
    """A `gridserve proxy` with one --routing, polling the replicas' Info every half second for /metrics."""

    def __init__(self, c: Cluster, routing: str):
        self.port_file = c.root / f"proxy-{routing}.port"
        self.port_file.unlink(missing_ok=True)
        c._spawn(f"proxy-{routing}", ["proxy", "--head", c.grpc_address, "--port", "0", "--port-file",
                                      str(self.port_file), "--routing", routing, "--metrics-interval", "0.5",
                                      "--cluster-token-file", str(c.token_file)])
        port = wait_for(lambda: self.port_file.is_file() and self.port_file.read_text().strip(), 60, "proxy port")
        self.url = f"http://127.0.0.1:{int(port)}"


async def scrape(session: aiohttp.ClientSession, url: str, model: str) -> dict[str, tuple[float, float]]:
    """{replica: (prompt tokens cached, prefilled)} from the proxy's /metrics."""
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "gridserve_replica_prompt_tokens_cached_total":
                out.setdefault(s.labels["replica"], [0.0, 0.0])[0] = s.value
            elif s.name == "gridserve_replica_prompt_tokens_prefilled_total":
                out.setdefault(s.labels["replica"], [0.0, 0.0])[1] = s.value
    return {rid: (v[0], v[1]) for rid, v in out.items()}


async def settled(session, url: str, model: str, replicas: int) -> dict[str, tuple[float, float]]:
    """The counters once two polls in a row agree on them for `replicas` replicas (nothing is running)."""
    last = None
    for _ in range(120):
        now = await scrape(session, url, model)
        if len(now) == replicas and now == last:
            return now
        last = now
        await asyncio.sleep(0.6)
    raise SystemExit(f"/metrics never showed steady prefix-cache counters for {replicas} replicas: {last}")


async def turn(session, url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str, str]:
    """One streamed chat turn: (seconds to the first content, the answer's text, the replica that served it)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first, parts = None, []
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {(await r.text())[:300]}")
        replica = r.headers.get("X-Replica-Id", "")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            if delta and first is None:
                first = time.perf_counter() - t0
            parts.append(delta)
    return (first if first is not None else time.perf_counter() - t0), "".join(parts), replica


async def conversation(session, url: str, model: str, n: int, args, out: dict) -> None:
    pauses = random.Random(n)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Tell me about {TOPICS[n % len(TOPICS)]} (question {n})."}]
    for t in range(args.turns):
        if t:
            await asyncio.sleep(pauses.uniform(0, 2 * args.think))
        try:
            ttft, text, replica = await turn(session, url, model, messages, args.max_tokens)
        except (RuntimeError, aiohttp.ClientError) as e:
            out["failed"].append(repr(e))
            return
        out["ttft"].append(ttft)
        out["served"].setdefault(n, []).append(replica)
        messages += [{"role": "assistant", "content": text},
                     {"role": "user", "content": FOLLOW_UPS[(n + t) % len(FOLLOW_UPS)]}]


async def workload(url: str, model: str, args) -> dict:
    out = {"ttft": [], "served": {}, "failed": []}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(turn(session, url, model, [{"role": "user", "content": f"Say hello, {i}."}], 4)
                               for i in range(4)))  # warm-up: short prompts spread over both replicas
        before = await settled(session, url, model, 2)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(args.conversations):
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                await conversation(session, url, model, queue.get_nowait(), args, out)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        out["wall_s"] = time.perf_counter() - t0
        after = await settled(session, url, model, 2)
    cached = sum(after[r][0] - before.get(r, (0, 0))[0] for r in after)
    prefilled = sum(after[r][1] - before.get(r, (0, 0))[1] for r in after)
    out.update(cached=cached, prefilled=prefilled, per_replica={r: (after[r][0] - before.get(r, (0, 0))[0],
                                                                      after[r][1] - before.get(r, (0, 0))[1])
                                                                  for r in sorted(after)})
    return out


def run(c: Cluster, model: str, routing: str, args) -> dict:
    proxy = Proxy(c, routing)
    try:
        c.cli("deploy", model, "--replicas", "2")
        c.wait_ready(model, 2, timeout=300)
        wait_for(lambda: _ready_count(proxy.url, model) == 2, 60, "the proxy to route to both replicas")
        out = asyncio.run(workload(proxy.url, model, args))
    finally:
        c.cli("undeploy", model, check=False)
        c.kill(f"proxy-{routing}", 15)
    wait_for(lambda: not c.replicas(model), 120, "the replicas to stop")
    served = out["served"].values()
    total = out["cached"] + out["prefilled"]
    return {"routing": routing, "hit_rate": round(out["cached"] / total, 3) if total else 0.0,
            "cached_tokens": int(out["cached"]), "prefilled_tokens": int(out["prefilled"]),
            "ttft_p50_s": round(percentile(out["ttft"], 50), 3), "ttft_p99_s": round(percentile(out["ttft"], 99), 3),
            "requests": len(out["ttft"]), "failed": len(out["failed"]),
            "replicas_per_conversation": round(sum(len(set(s)) for s in served) / max(1, len(served)), 2),
            "wall_s": round(out["wall_s"], 1),
            "per_replica": {r: [int(a), int(b)] for r, (a, b) in out["per_replica"].items()}}


def _ready_count(url: str, model: str) -> int:
    from support.cluster import http
    status, _, body = http("GET", f"{url}/ready", timeout=5)
    return json.loads(b"".join(body)).get("models", {}).get(model, 0) if status == 200 else 0


def table(rows: list[dict]) -> str:
    lines = ["| routing | prefix-cache hit rate | cached / prefilled prompt tokens | TTFT p50 | TTFT p99 | requests "
             "| failed | replicas per conversation |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['routing']} | {r['hit_rate']:.1%} | {r['cached_tokens']:,} / {r['prefilled_tokens']:,} "
                     f"| {r['ttft_p50_s']:.3f} s | {r['ttft_p99_s']:.3f} s | {r['requests']} | {r['failed']} "
                     f"| {r['replicas_per_conversation']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or tiny (the tiny test model)")
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=4, help="conversations running at once")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    ap.add_argument("--think", type=float, default=2.0,
                    help="mean seconds between an answer and the conversation's next turn (0: none)")
    ap.add_argument("--routing", choices=ROUTINGS, action="append", help="only these (default: both)")
    args = ap.parse_args()
    rows, load = [], [load_average()]
    with tempfile.TemporaryDirectory() as tmp:
        configs = model_configs(args.model, Path(tmp))
        with Cluster(Path(tmp), configs) as c:
            c.start_head(extra=["--no-proxy"], wait_for_proxy=False)
            c.start_scheduler("n1", num_cpus=4, extra=["--threads-per-replica", "1"])
            for routing in args.routing or ROUTINGS:
                rows.append(run(c, args.model, routing, args))
                load.append(load_average())
    print(f"model {args.model}: {args.conversations} conversations x {args.turns} turns, {args.concurrency} at "
          f"once, {args.max_tokens} tokens per answer, {args.think:g} s mean pause between turns; load average "
          f"{' -> '.join(load)}")
    print(table(rows))
    print(json.dumps({"bench": "prefix_routing", "model": args.model, "conversations": args.conversations,
                      "turns": args.turns, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                      "think_s": args.think,
                      "load_average": load, "results": rows}))


if __name__ == "__main__":
    main()
