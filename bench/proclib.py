"""Shared by bench/scale.py and bench/soak.py: spawn gridserve processes, sample them, talk to the head."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from gridserve.common.security import METADATA_KEY
from gridserve.v1 import head_pb2, head_pb2_grpc

GRIDSERVE = str(Path(sys.executable).parent / "gridserve")
TICK = os.sysconf("SC_CLK_TCK")
LINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")


class Procs:
    """Named subprocesses with their logs under `root`; stop() ends every one still running."""

    def __init__(self, root: Path, env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen([GRIDSERVE, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(60)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def head_info(state: Path, pid: int) -> dict | None:
    try:
        info = json.loads((state / "head.json").read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("pid") == pid else None


class HeadClient:
    """Admin calls straight over gRPC with the cluster token (polling without a CLI process each time)."""

    def __init__(self, address: str, token_file: Path):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20)])
        self.admin = head_pb2_grpc.AdminServiceStub(self.channel)
        self.metadata = ((METADATA_KEY, token_file.read_text().strip()),)

    def status(self, timeout: float = 30) -> head_pb2.ClusterStatus:
        return self.admin.Status(head_pb2.StatusRequest(), metadata=self.metadata, timeout=timeout)

    def deploy(self, model: str, replicas: int) -> str:
        return self.admin.Deploy(head_pb2.DeployRequest(model=model, replicas=replicas),
                                 metadata=self.metadata, timeout=60).message

    def scale(self, model: str, replicas: int) -> str:
        return self.admin.Scale(head_pb2.ScaleRequest(model=model, replicas=replicas),
                                metadata=self.metadata, timeout=60).message

    def close(self) -> None:
        self.channel.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def log_events(path: Path, name: str) -> list[tuple[float, dict]]:
    """(unix time, fields) of every `name` event line in a gridserve log."""
    out = []
    needle = f" {name} "
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if needle not in line and not line.endswith(f" {name}"):
            continue
        m = LINE_TIME.match(line)
        if not m:
            continue
        t = time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        t += int(m.group(1)[20:23]) / 1000
        fields = dict(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", line))
        fields["_role"] = line.split()[1]  # the process that wrote it (a head's log also holds its proxy's)
        out.append((t, fields))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])
