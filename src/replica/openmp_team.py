"""Keeps the engine thread's OpenMP team the only one in the process (torch's and the block kernels')."""
from __future__ import annotations

import ctypes
import os

OMP_PAUSE_HARD = 2


def release_openmp_threads() -> bool:
    """End the OpenMP worker threads that torch operations run in the calling thread started, if any
    (libgomp's omp_pause_resource_all); True if libgomp is loaded and did.

    The engine thread must own the process's only team: libgomp counts every team's threads, and
    with more of them than CPUs each team's workers sleep between parallel regions instead of
    waiting awake, so every operation pays a wake-up. On 2 CPUs one decoding row's step took 31.7 ms
    instead of 16.2 while the main thread's idle team lived. The replica never computes in its main
    thread (it loads in a thread that then exits); a process that does, a benchmark or a test, gets
    its team ended here when it starts an engine."""
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # only the one torch loaded
    except OSError:
        return False
    pause = getattr(gomp, "omp_pause_resource_all", None)
    return pause is not None and pause(OMP_PAUSE_HARD) == 0
