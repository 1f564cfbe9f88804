"""Process helpers: children that die with their parent, stopping them gracefully, and role entry points."""
from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import os
import signal
import subprocess
import logging
import sys

from gridserve.common.errors import ConfigError
from gridserve.common.eventlog import event, setup_logging

log = logging.getLogger("gridserve.procs")

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


def run_service(role: str, parse_config, serve, argv: list[str] | None = None) -> int:
    """The main() of a long-running role: tie to a spawning parent, parse flags, log, run `serve` (its event
    loop watched, see watch_event_loop) until a signal. A bad flag or config is one `fatal:` line and
    exit 2; Ctrl-C is 130."""
    exit_with_parent()
    faulthandler.enable()  # a crash in native code (gRPC, torch) leaves its stack in the log, not silence
    try:
        cfg = parse_config(argv)
        setup_logging(role, cfg.log_level)
        return asyncio.run(watch_event_loop(serve(cfg)))
    except ConfigError as e:
        print(f"fatal: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


LOOP_STALL_DUMP_S = 30.0  # an event loop blocked this long gets every thread's stack written to stderr
LOOP_STATS_EVERY = 3  # heartbeats (5 s each) between `loop_stats` lines: the count of asyncio tasks


async def watch_event_loop(main):
    """Runs `main` with a heartbeat that keeps pushing back a faulthandler stack dump: if the event loop
    is ever blocked (a deadlock in native code), the log shows where instead of going silent."""
    async def heartbeat() -> None:
        beats = 0
        while True:
            faulthandler.dump_traceback_later(LOOP_STALL_DUMP_S, repeat=True)
            if beats % LOOP_STATS_EVERY == 0:  # what a soak watches for leaks besides RSS and fds
                event(log, "loop_stats", tasks=len(asyncio.all_tasks()))
            beats += 1
            await asyncio.sleep(LOOP_STALL_DUMP_S / 6)

    beat = asyncio.create_task(heartbeat(), name="loop-stall-dump")
    try:
        return await main
    finally:
        beat.cancel()
        faulthandler.cancel_dump_traceback_later()


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
