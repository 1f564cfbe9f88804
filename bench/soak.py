"""Soak: mixed load with a fault every interval; lost requests, and RSS / fds / asyncio tasks of every process.

The cluster: a head (with the proxy it supervises), two real schedulers each running one replica of the
real model (SmolLM2 by default), and two `gridserve simulate` processes serving fake-engine replicas.
Load, all through the proxy: `--real-streams` streams to the real model (8) and `--fake-streams` to the
fake one (hundreds), each request after the last. Every `--fault-every` seconds one fault, in turn:
kill -9 of a real replica, of the proxy, of the head (restarted with the same flags), of a scheduler
(restarted). The head restarts the proxy itself.

A request is lost when it does not end with a whole answer (a non-200 status, a connection error, an
error piece in the body). Requests that fail while the proxy is down are its own clients' (their
connection was the killed process) and are counted apart. Every process is sampled every
`--sample-every` seconds: RSS and open fds from /proc, asyncio tasks from its `loop_stats` log line.
Leak check per process incarnation (a pid), after `--warmup` seconds: growth (mean of the last fifth
against the first fifth) and trend (least-squares slope times the span, over the mean) must stay
within 5 %. Writes OUT/soak.json and OUT/soak.png; exits 1 when a request was lost or a series grew.

    python bench/soak.py                      # 30 minutes, a fault every 2 minutes
    python bench/soak.py --minutes 2 --fault-every 25 --fake-streams 100   # what `make test` runs
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from proclib import (HeadClient, Procs, head_info, load_average, log_events, open_fds, rss_bytes,  # noqa: E402
                     wait_for)

from gridserve.v1 import head_pb2  # noqa: E402

READY = head_pb2.REPLICA_STATE_READY
REPO = Path(__file__).resolve().parent.parent
FAULTS = ("replica", "proxy", "head", "scheduler")
LIMIT = 0.05


class Soak:
    def __init__(self, a):
        self.a = a
        self.root = Path(a.root or tempfile.mkdtemp(prefix="gridserve-soak-"))
        self.state = self.root / "state"
        self.procs = Procs(self.root, env={"HF_HUB_OFFLINE": "1"})
        self.http_port = a.http_port
        self.counts = {"real_ok": 0, "fake_ok": 0, "lost": 0, "failed_while_proxy_down": 0}
        self.lost: list[dict] = []
        self.faults: list[dict] = []
        self.samples: list[dict] = []  # {t, name, pid, rss, fds}
        self.proxy_down: list[list[float]] = []  # [start, end] windows
        self.t0 = time.monotonic()
        self.stop = asyncio.Event()

    # the cluster

    def head_args(self) -> list[str]:
        return ["head", "--host", "127.0.0.1", "--grpc-port", str(self.a.grpc_port), "--http-port",
                str(self.http_port), "--state-dir", str(self.state), "--model-configs", str(self.a.model_configs),
                "--node-timeout", "5"]

    def start_head(self) -> None:
        proc = self.procs.spawn("head", self.head_args())
        info = wait_for(lambda: proc.poll() is None and head_info(self.state, proc.pid), 60, "head.json")
        self.head = info["grpc_address"]
        self.token = self.state / "cluster-token"

    def start_scheduler(self, i: int) -> None:
        self.procs.spawn(f"scheduler-{i}", ["scheduler", "--head", self.head, "--node-id", f"real{i}",
                                            "--num-cpus", "1", "--host", "127.0.0.1", "--work-dir",
                                            str(self.root / f"real{i}"), "--cluster-token-file", str(self.token)])

    def start_sim(self, i: int) -> None:
        self.procs.spawn(f"simulate-{i}", ["simulate", "--head", self.head, "--nodes", str(self.a.sim_nodes),
                                           "--cpus-per-node", "1", "--node-prefix", f"sim{i}",
                                           "--log-level", "INFO", "--cluster-token-file", str(self.token)])

    def client(self) -> HeadClient:
        return HeadClient(self.head, self.token)

    def setup(self) -> None:
        self.start_head()
        for i in range(2):
            self.start_scheduler(i)
            self.start_sim(i)
        c = self.client()
        try:
            wait_for(lambda: sum(n.alive for n in c.status().nodes) == 2 + 2 * self.a.sim_nodes, 120, "nodes")
            # real replicas pinned one per real node: 1 CPU each, so placement puts one on each
            c.deploy(self.a.real_model, 2)
            c.deploy("fake", self.a.fake_replicas)
            wait_for(lambda: self.ready(c, self.a.real_model) >= 2 and self.ready(c, "fake") >= self.a.fake_replicas,
                     600, "replicas READY")
        finally:
            c.close()
        wait_for(lambda: self.proxy_ready(), 60, "proxy /ready")

    @staticmethod
    def ready(c: HeadClient, model: str) -> int:
        return sum(1 for r in c.status().replicas if r.model == model and r.state == READY)

    def proxy_ready(self) -> bool:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ready", timeout=2) as r:
            return r.status == 200

    # load

    async def stream_loop(self, session, model: str, kind: str, max_tokens: int) -> None:
        url = f"http://127.0.0.1:{self.http_port}/v1/chat/{model}"
        body = json.dumps({"messages": [{"role": "user", "content": "Tell me about lighthouses."}],
                           "max_tokens": max_tokens, "temperature": 0})
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    text = (await resp.read()).decode("utf-8", "replace")
                    ok = resp.status == 200 and '"error"' not in text
                    why = f"HTTP {resp.status}: {text[-200:]}" if not ok else ""
            except Exception as e:  # noqa: BLE001 - a connection error is a lost request (or the proxy's own)
                ok, why = False, f"{type(e).__name__}: {e}"
            if ok:
                self.counts[f"{kind}_ok"] += 1
                continue
            self.record_failure(kind, started, time.monotonic(), why)
            await asyncio.sleep(0.5)

    def record_failure(self, kind: str, started: float, ended: float, why: str) -> None:
        """A request that ends in a proxy-down window (or started before one and failed in it) was the
        killed proxy's own client; any other failure is a lost request."""
        own = any(s - 1.0 <= ended and (e is None or started <= e + 3.0) for s, e in self.proxy_down)
        self.counts["failed_while_proxy_down" if own else "lost"] += 1
        if not own:
            self.lost.append({"t": round(ended - self.t0, 1), "kind": kind, "why": why[:300]})

    # faults

    async def faults_loop(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), self.a.fault_every)
                return
            except asyncio.TimeoutError:
                pass
            kind = FAULTS[i % len(FAULTS)]
            i += 1
            t = time.monotonic()
            try:
                detail = await asyncio.to_thread(self.fault, kind)
            except Exception as e:  # noqa: BLE001 - report it, go on
                detail = f"fault failed: {e}"
            self.faults.append({"t": round(t - self.t0, 1), "kind": kind, "detail": detail,
                                "seconds": round(time.monotonic() - t, 1)})
            print(f"[{t - self.t0:6.0f}s] fault {kind}: {detail}", flush=True)

    def fault(self, kind: str) -> str:
        c = self.client()
        try:
            st = c.status()
        finally:
            c.close()
        if kind == "replica":
            r = random.choice([r for r in st.replicas if r.model == self.a.real_model and r.pid])
            signal_pid(r.pid)
            return f"killed replica {r.replica_id} pid {r.pid}"
        if kind == "proxy":
            window = [time.monotonic(), None]
            self.proxy_down.append(window)
            signal_pid(st.proxy_pid)
            wait_for(lambda: self.proxy_pid() not in (0, st.proxy_pid) and self.proxy_ready(), 60, "proxy back")
            window[1] = time.monotonic()
            return f"killed proxy pid {st.proxy_pid}"
        if kind == "head":
            self.procs.kill("head")
            self.start_head()
            return "killed the head; restarted"
        name = "scheduler-0"
        self.procs.kill(name)
        time.sleep(1.0)
        self.start_scheduler(0)
        return "killed scheduler real0 (and its replica); restarted"

    def proxy_pid(self) -> int:
        c = self.client()
        try:
            return c.status().proxy_pid
        finally:
            c.close()

    # sampling

    def processes(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.procs.procs.items() if p.poll() is None}
        try:
            c = self.client()
            try:
                st = c.status()
            finally:
                c.close()
            if st.proxy_pid:
                out["proxy"] = st.proxy_pid
            for r in st.replicas:
                if r.model == self.a.real_model and r.pid:
                    out[f"replica-{r.node_id}"] = r.pid
        except Exception:  # noqa: BLE001 - the head may be down just now
            pass
        return out

    async def sample_loop(self) -> None:
        while not self.stop.is_set():
            procs = await asyncio.to_thread(self.processes)
            t = time.monotonic() - self.t0
            for name, pid in procs.items():
                try:
                    self.samples.append({"t": t, "name": name, "pid": pid, "rss": rss_bytes(pid),
                                         "fds": open_fds(pid)})
                except OSError:
                    pass
            try:
                await asyncio.wait_for(self.stop.wait(), self.a.sample_every)
            except asyncio.TimeoutError:
                pass

    async def run(self) -> dict:
        import aiohttp
        self.t0 = time.monotonic()
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as session:
            tasks = [asyncio.create_task(self.stream_loop(session, self.a.real_model, "real", 48))
                     for _ in range(self.a.real_streams)]
            tasks += [asyncio.create_task(self.stream_loop(session, "fake", "fake", 40))
                      for _ in range(self.a.fake_streams)]
            tasks += [asyncio.create_task(self.faults_loop()), asyncio.create_task(self.sample_loop())]
            await asyncio.sleep(self.a.minutes * 60)
            self.stop.set()
            await asyncio.wait(tasks, timeout=120)
            for t in tasks:
                t.cancel()
        return self.report()

    # the report

    def task_series(self) -> list[dict]:
        """asyncio task counts from every log's loop_stats lines, named by log and writing role (the head's log
        also holds its proxy's lines); a log's incarnations follow each other (see incarnations)."""
        out = []
        base = time.time() - (time.monotonic() - self.t0)
        for log in sorted(self.root.rglob("*.log")):
            for t, fields in log_events(log, "loop_stats"):
                if "tasks" in fields and t >= base:
                    role = fields["_role"]
                    name = log.stem if role == log.stem else f"{log.stem}/{role}"
                    out.append({"t": t - base, "name": name, "tasks": int(fields["tasks"])})
        return out

    def report(self) -> dict:
        series: dict[tuple[str, int], list[dict]] = {}
        for s in self.samples:
            series.setdefault((s["name"], s["pid"]), []).append(s)
        checks = []
        for (name, pid), rows in sorted(series.items()):
            for metric in ("rss", "fds"):
                checks.append(check(name, pid, metric, [(r["t"], r[metric]) for r in rows], self.a.warmup))
        tasks = self.task_series()
        by_log: dict[str, list] = {}
        for s in tasks:
            by_log.setdefault(s["name"], []).append((s["t"], s["tasks"]))
        for name, rows in sorted(by_log.items()):
            for part in incarnations(rows, self.faults):
                checks.append(check(name, 0, "tasks", part, self.a.warmup))
        judged = [c for c in checks if c["judged"]]
        grew = [c for c in judged if not c["ok"]]
        result = {"minutes": self.a.minutes, "fault_every_s": self.a.fault_every, "real_model": self.a.real_model,
                  "real_streams": self.a.real_streams, "fake_streams": self.a.fake_streams, **self.counts,
                  "lost_examples": self.lost[:20], "faults": self.faults, "series_judged": len(judged),
                  "series_grew": grew, "load_end": load_average(), "checks": checks,
                  "samples": self.samples, "tasks": tasks}
        out = Path(self.a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(result, indent=2))
        plot(out, self.samples, tasks, self.faults)
        return result


def incarnations(rows: list, faults: list) -> list[list]:
    """Splits a log's task series where the count drops sharply (a restarted process starts small)."""
    parts, cur = [], []
    for t, v in rows:
        if cur and v < 0.5 * cur[-1][1]:
            parts.append(cur)
            cur = []
        cur.append((t, v))
    return [*parts, cur] if cur else parts


def check(name: str, pid: int, metric: str, points: list[tuple[float, float]], warmup: float) -> dict:
    """Growth (last fifth vs first fifth) and trend (slope x span / mean) after warm-up; judged only with
    at least five points after warm-up."""
    if not points:
        return {"name": name, "pid": pid, "metric": metric, "judged": False, "ok": True}
    start = points[0][0] + warmup
    pts = [(t, v) for t, v in points if t >= start]
    out = {"name": name, "pid": pid, "metric": metric, "points": len(pts), "judged": len(pts) >= 5, "ok": True}
    if len(pts) < 5:
        return out
    k = max(1, len(pts) // 5)
    first = sum(v for _, v in pts[:k]) / k
    last = sum(v for _, v in pts[-k:]) / k
    mean = sum(v for _, v in pts) / len(pts)
    n = len(pts)
    tm = sum(t for t, _ in pts) / n
    den = sum((t - tm) ** 2 for t, _ in pts) or 1.0
    slope = sum((t - tm) * (v - mean) for t, v in pts) / den
    span = pts[-1][0] - pts[0][0]
    growth = (last - first) / first if first else 0.0
    trend = slope * span / mean if mean else 0.0
    # a difference of a few fds or tasks is not a leak when the count is small: allow 2 of them
    slack = 2 / mean if metric in ("fds", "tasks") and mean else 0.0
    out.update(first=first, last=last, growth=round(growth, 4), trend=round(trend, 4),
               ok=growth <= LIMIT + slack and trend <= LIMIT + slack)
    return out


def signal_pid(pid: int) -> None:
    import os
    os.kill(pid, signal.SIGKILL)


def plot(out: Path, samples: list[dict], tasks: list[dict], faults: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric, label in ((axes[0], "rss", "RSS (MiB)"), (axes[1], "fds", "open fds")):
        lines: dict[tuple, list] = {}
        for s in samples:
            lines.setdefault((s["name"], s["pid"]), []).append((s["t"], s[metric] / (2**20 if metric == "rss" else 1)))
        for (name, pid), pts in sorted(lines.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name if len(pts) > 1 else None)
        ax.set_ylabel(label)
        ax.set_xlabel("seconds")
    lines2: dict[str, list] = {}
    for s in tasks:
        lines2.setdefault(s["name"], []).append((s["t"], s["tasks"]))
    for name, pts in sorted(lines2.items()):
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    axes[2].set_ylabel("asyncio tasks")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        for f in faults:
            ax.axvline(f["t"], color="grey", alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--fault-every", type=float, default=120)
    p.add_argument("--real-model", default="smollm2")
    p.add_argument("--model-configs", default=str(REPO / "model_configs.json"))
    p.add_argument("--real-streams", type=int, default=8)
    p.add_argument("--fake-streams", type=int, default=300)
    p.add_argument("--fake-replicas", type=int, default=40)
    p.add_argument("--sim-nodes", type=int, default=4, help="nodes per simulate process (2 processes)")
    p.add_argument("--sample-every", type=float, default=10)
    p.add_argument("--warmup", type=float, default=60)
    p.add_argument("--grpc-port", type=int, default=50971)
    p.add_argument("--http-port", type=int, default=50972)
    p.add_argument("--root", default="")
    p.add_argument("--out", default=str(REPO / "docs" / "scale"))
    a = p.parse_args()
    soak = Soak(a)
    try:
        soak.setup()
        result = asyncio.run(soak.run())
    finally:
        soak.procs.stop()
    print(json.dumps({k: v for k, v in result.items() if k not in ("checks", "samples", "tasks")}, indent=2))
    return 0 if result["lost"] == 0 and not result["series_grew"] else 1


if __name__ == "__main__":
    sys.exit(main())
