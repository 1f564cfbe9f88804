"""Process helpers: children that die with their parent, and stopping them gracefully."""
from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
PARENT_ENV = "GRIDSERVE_PARENT_PID"


def tied_child_env(base: dict | None = None) -> dict:
    """The environment for a child that should die with this process (see exit_with_parent).

    The child arms the tie itself: a preexec_fn would run Python between fork and exec, which is
    unsafe once gRPC has started its threads (children crashed at random with SIGSEGV)."""
    env = dict(os.environ if base is None else base)
    env[PARENT_ENV] = str(os.getpid())
    return env


def exit_with_parent() -> None:
    """Called first by a role's main(): if its spawner asked for it, get SIGTERM when the spawner dies.

    The variable is removed so this process's own children (the head's proxy) are not tied by accident."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit():
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # the spawner died before the tie was armed
        os.kill(os.getpid(), signal.SIGTERM)


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
