"""The one runner of every role: a signal stops the service gracefully, exit codes are the defined ones, and a
blocked event loop leaves every thread's stack in the log."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from gridserve.common.service import ExitCode

BLOCKED_LOOP = """
import asyncio, time
from gridserve.common import service
service.LOOP_STALL_DUMP_S = 0.3

async def main():
    await asyncio.sleep(0.1)      # the heartbeat has armed the dump
    time.sleep(1.0)               # the loop is blocked, as by a deadlock in native code
    return 7

print("result", asyncio.run(service.watch_event_loop(main())))
"""

# A turning loop with a threshold well above a busy machine's scheduling hiccups: the heartbeat re-arms
# the dump every 1/6 s and never lets it fire.
HEALTHY_LOOP = BLOCKED_LOOP.replace("time.sleep(1.0)", "await asyncio.sleep(1.0)").replace(
    "LOOP_STALL_DUMP_S = 0.3", "LOOP_STALL_DUMP_S = 1.0")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def test_a_blocked_event_loop_dumps_the_stacks_and_the_service_still_returns():
    res = run(BLOCKED_LOOP)
    assert res.returncode == 0 and "result 7" in res.stdout
    assert "Timeout (0:00:00.300000)!" in res.stderr and "in main" in res.stderr


def test_a_loop_that_keeps_turning_dumps_nothing():
    res = run(HEALTHY_LOOP)
    assert res.returncode == 0 and "result 7" in res.stdout
    assert res.stderr == ""


TOY_SERVICE = """
import asyncio, dataclasses, sys
from gridserve.common.errors import ConfigError, FatalError
from gridserve.common.service import run_service, stop_or_task_exit

@dataclasses.dataclass
class Cfg:
    mode: str
    log_level: str = "INFO"

def parse(argv):
    if argv[0] == "bad-flag":
        raise ConfigError("--x: must be positive")
    return Cfg(argv[0])

async def serve(cfg, stop):
    if cfg.mode == "fatal":
        raise FatalError("cannot bind 127.0.0.1:1:\\n  address in use")
    if cfg.mode == "task-dies":
        async def worker():
            raise RuntimeError("boom")
        return await stop_or_task_exit(stop, [asyncio.create_task(worker(), name="worker")])
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        print("cleaned up after", stop.signal, flush=True)

sys.exit(run_service("toy", parse, serve, sys.argv[1:]))
"""


def toy(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TOY_SERVICE, mode], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_the_service_gracefully_with_exit_0(sig):
    proc = subprocess.Popen([sys.executable, "-c", TOY_SERVICE, "serve"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.OK == 0
    assert out == f"cleaned up after {sig.name}\n"


@pytest.mark.parametrize("mode", ["bad-flag", "fatal"])
def test_a_fatal_error_is_one_fatal_line_and_exit_3(mode):
    res = toy(mode)
    assert res.returncode == ExitCode.FATAL == 3
    want = "--x: must be positive" if mode == "bad-flag" else "cannot bind 127.0.0.1:1: address in use"
    assert res.stderr == f"fatal: {want}\n"


def test_a_background_task_that_dies_stops_the_service_with_exit_1():
    res = toy("task-dies")
    assert res.returncode == ExitCode.ERROR == 1
    assert "ERROR task_failed task=worker error=RuntimeError('boom')" in res.stderr
