"""The one runner of the four long-running roles (head, scheduler, replica, proxy): flags, logging,
SIGTERM/SIGINT as a graceful stop, a watched event loop, and the exit codes, defined once."""
from __future__ import annotations

import asyncio
import contextlib
import enum
import faulthandler
import logging
import signal
import sys
from typing import Awaitable, Callable

from gridserve.common.errors import FatalError
from gridserve.common.eventlog import event, setup_logging
from gridserve.common.procs import exit_with_parent

log = logging.getLogger("gridserve.service")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ExitCode(enum.IntEnum):
    """How a role's process ends. A spawner reads them: a scheduler gives up on a replica that exits
    FATAL (restarting cannot help) and restarts it after anything else."""
    OK = 0           # stopped by a signal (or its work is done), cleanly
    ERROR = 1        # an unexpected error; a restart may help
    USAGE = 2        # a malformed flag (argparse's own code)
    FATAL = 3        # a FatalError: bad config, a model that cannot load, a port that cannot be bound
    INTERRUPTED = 130  # Ctrl-C arrived before the service could handle it


class Stop(asyncio.Event):
    """Set when the process is asked to stop (SIGTERM or SIGINT); `signal` names the signal."""

    def __init__(self):
        super().__init__()
        self.signal = ""

    def request(self, why: str) -> None:
        if not self.is_set():
            self.signal = why
            self.set()


Serve = Callable[[object, Stop], Awaitable[int | None]]


def run_service(role: str, parse_config: Callable, serve: Serve, argv: list[str] | None = None) -> int:
    """The main() of a role: tie to a spawning parent, parse flags, log as `role`, run `serve(cfg, stop)`
    (its event loop watched, see watch_event_loop) until it returns; `stop` is set by SIGTERM/SIGINT and
    `serve` winds down gracefully then. A FatalError anywhere is one `fatal:` line on stderr and exit 3."""
    exit_with_parent()
    faulthandler.enable()  # a crash in native code (gRPC, torch) leaves its stack in the log, not silence
    try:
        cfg = parse_config(argv)
        setup_logging(role, cfg.log_level)
        code = asyncio.run(watch_event_loop(_until_stopped(serve, cfg)))
        return int(ExitCode.OK if code is None else code)
    except FatalError as e:
        print(f"fatal: {one_line(e.message)}", file=sys.stderr, flush=True)
        return ExitCode.FATAL
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


async def _until_stopped(serve: Serve, cfg) -> int | None:
    loop = asyncio.get_running_loop()
    stop = Stop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.request, sig.name)
    try:
        return await serve(cfg, stop)
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def stop_or_task_exit(stop: Stop, tasks: list[asyncio.Task]) -> ExitCode:
    """Waits until `stop` is set (OK) or one of the background `tasks` ends (ERROR, logged: such a task is
    meant to run until cancelled, so the service stops rather than go on without it)."""
    waiter = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    code = ExitCode.OK
    for t in done:
        if t is not waiter:
            error = "cancelled" if t.cancelled() else repr(t.exception())
            event(log, "task_failed", logging.ERROR, task=t.get_name(), error=error)
            stop.request(f"task {t.get_name()} ended")
            code = ExitCode.ERROR
    return code


async def cancel_and_wait(*tasks: asyncio.Task | None) -> None:
    """Cancels the tasks, then waits for each to end, swallowing what they raise: the cleanup half of a
    task's life, which must not fail the caller's own cleanup."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


def one_line(message: str) -> str:
    return " ".join(message.split())


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
