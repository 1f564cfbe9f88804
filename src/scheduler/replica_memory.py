"""A replica's memory as its scheduler measures it: RSS with psutil, GPU memory from nvidia-smi, the limit."""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import time

import psutil

GPU_SAMPLE_EVERY_S = 5.0
NVIDIA_SMI_TIMEOUT_S = 5.0


def process_rss(pid: int) -> int:
    """Resident bytes of the process and its children (0 when it is gone)."""
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total
    except psutil.Error:
        return 0


def over_limit(rss: int, limit_bytes: int) -> str:
    """Why a replica must be stopped ('over its memory limit (1200 MiB): RSS 1301 MiB'), or '' when it fits."""
    if not limit_bytes or rss <= limit_bytes:
        return ""
    return f"over its memory limit ({limit_bytes // 2**20} MiB): RSS {rss // 2**20} MiB"


class GpuMemory:
    """GPU memory per process id, sampled from nvidia-smi at most every GPU_SAMPLE_EVERY_S, off the event loop.
    Without GPUs (or without nvidia-smi) every process holds 0."""

    def __init__(self, num_gpus: float):
        self.smi = shutil.which("nvidia-smi") if num_gpus > 0 else None
        self.by_pid: dict[int, int] = {}
        self.sampled = 0.0
        self._task: asyncio.Task | None = None

    def get(self, pid: int) -> int:
        """The last sample for `pid`; starts a new sample when the last one is old."""
        idle = self._task is None or self._task.done()
        if self.smi and idle and time.monotonic() - self.sampled > GPU_SAMPLE_EVERY_S:
            self.sampled = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._sample())
        return self.by_pid.get(pid, 0)

    async def _sample(self) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            out, _ = await asyncio.wait_for(proc.communicate(), NVIDIA_SMI_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            return
        self.by_pid = parse_compute_apps(out.decode(errors="replace"))


def parse_compute_apps(text: str) -> dict[int, int]:
    """nvidia-smi's 'pid, used MiB' lines to bytes per pid (a process on several GPUs sums)."""
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = out.get(int(parts[0]), 0) + int(parts[1]) * 2**20
    return out
