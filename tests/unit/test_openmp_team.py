"""The engine thread's OpenMP team stays the process's only one: a caller's own team can be ended."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, torch
from gridserve.replica.openmp_team import release_openmp_threads
torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
torch.randn(512, 512).add(1.0)   # a parallel op: this thread's team starts its worker
with_team = threads()
assert with_team == before + 1, (before, with_team)
assert release_openmp_threads()
assert threads() == before, (before, threads())
torch.randn(512, 512).add(1.0)   # torch still works: a new team starts when needed
print("ok")
"""


def test_release_openmp_threads_ends_the_calling_threads_team_and_torch_still_runs():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_without_libgomp_loaded_it_reports_nothing_done():
    done = subprocess.run([sys.executable, "-c", "from gridserve.replica.openmp_team import release_openmp_threads;"
                           "print(release_openmp_threads())"], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
