"""The one way tests wait: poll a condition until it holds or a deadline passes, sync or async; and free ports."""
from __future__ import annotations

import asyncio
import inspect
import socket
import time


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Polls predicate() until it returns something truthy and returns that; fails the test naming `what` on timeout.
    An AssertionError from the predicate means it saw something that will not get better, and is raised at once."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as e:  # the thing polled may not be up yet
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last_error})")
        time.sleep(interval)


async def wait_until(predicate, timeout: float = 5.0, what: str = "a condition", interval: float = 0.02):
    """The asyncio twin of wait_for: predicate may be sync or async; polls without blocking the loop."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
        except AssertionError:
            raise
        except Exception as e:
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last_error})")
        await asyncio.sleep(interval)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, for processes that must come back on the same one. Never one this
    test process handed out before: the kernel may offer a just-closed port again, and two calls in a row
    (a gRPC and an HTTP port) must not get the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
