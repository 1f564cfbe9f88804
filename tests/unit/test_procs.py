"""Role entry-point helpers: a blocked event loop leaves every thread's stack in the log."""
from __future__ import annotations

import subprocess
import sys

BLOCKED_LOOP = """
import asyncio, time
from gridserve.common import procs
procs.LOOP_STALL_DUMP_S = 0.3

async def main():
    await asyncio.sleep(0.1)      # the heartbeat has armed the dump
    time.sleep(1.0)               # the loop is blocked, as by a deadlock in native code
    return 7

print("result", asyncio.run(procs.watch_event_loop(main())))
"""

HEALTHY_LOOP = BLOCKED_LOOP.replace("time.sleep(1.0)", "await asyncio.sleep(1.0)")


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
