"""Child-process helpers: children that die with their parent, and stopping them gracefully."""
from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn that makes the child receive `sig` when its parent dies (Linux), so no orphans."""
    def preexec() -> None:
        os.setpgid(0, 0)  # own process group: a terminal's Ctrl-C reaches the parent, which stops us in order
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return preexec


def python_module_cmd(module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


async def stop_async(proc: asyncio.subprocess.Process, grace: float = 10.0) -> int | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the exit code."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(proc.wait(), grace)
    except ProcessLookupError:
        return proc.returncode
    except asyncio.TimeoutError:
        proc.kill()
        return await proc.wait()


def stop_sync(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """The blocking twin of stop_async, for the CLI."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(grace)
    except ProcessLookupError:
        return proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
