"""glibc malloc settings that keep a replica's resident memory to what it uses (no-ops elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("gridserve.replica.process_memory")
_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
MALLOC_ARENAS = 2


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Call before threads start. glibc gives each thread that allocates its own arena (up to 8 per
    core), each keeping what its thread freed; a replica's threads (engine, its OpenMP workers, gRPC's)
    allocate little, so two arenas are enough and keep ~8 MB less resident. True if applied."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Give the memory malloc holds free back to the system: loading a model and its tokenizer leaves
    ~20 MB of freed parsing buffers resident (transformers' tokenizer load alone, ~40 MB). True if
    glibc released any."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
