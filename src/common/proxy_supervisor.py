"""Runs an HTTP proxy as a child of the head or of a node's scheduler (or adopts one its previous owner left
running), restarts it when it exits, and reports its port and pid to the owner."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

from gridserve.common.backoff import Backoff
from gridserve.common.eventlog import event
from gridserve.common.files import read_port_file
from gridserve.common.procs import python_module_cmd, stop_async

log = logging.getLogger("gridserve.proxy_supervisor")

FIRST_BACKOFF = 0.25
MAX_BACKOFF = 5.0
STABLE_SECONDS = 10.0  # a proxy that ran this long resets the backoff
PORT_FILE_POLL = 0.05
ADOPTED_POLL = 0.2  # an adopted proxy is not our child: its exit is noticed by polling /proc
PROXY_MODULE = "gridserve.proxy"


def proxy_cmdline(pid: int) -> list[str]:
    """The argv of a live gridserve proxy with this pid, else [] (gone, a zombie, or another program)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            return []
    except (OSError, IndexError):
        return []
    return argv if PROXY_MODULE in argv else []


def display_host(host: str) -> str:
    """A host clients can use: wildcards become 127.0.0.1, IPv6 literals get brackets."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class ProxySupervisor:
    """Starts `python -m gridserve.proxy`, learns its port from the port file, restarts it with a short
    backoff when it exits (on the port it first bound). Not tied to the head's life (no tied_child_env):
    a graceful head shutdown stops it explicitly."""

    def __init__(self, head_address: str, host: str, port: int, port_file: Path,
                 on_change: Callable[[str, int, int], None], api_key_file: Path | None = None,
                 security_args: list[str] = ()):
        self.head_address = head_address
        self.host = host
        self.port = port
        self.port_file = port_file  # <state-dir>/proxy.port
        self.api_key_file = api_key_file  # the proxy reads its keys here (0600), not from its argv
        self.security_args = list(security_args)  # the cluster token by file, TLS files
        self.on_change = on_change  # (http_address, pid, restarts)
        self.restarts = 0
        self.address = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.adopted_pid = 0  # a proxy a previous head started, supervised by polling
        self._stopping = False

    def command(self) -> list[str]:
        keys = ["--api-key-file", str(self.api_key_file)] if self.api_key_file else []
        return python_module_cmd("gridserve.proxy", "--head", self.head_address, "--host", self.host,
                                 "--port", str(self.port), "--port-file", str(self.port_file), *keys,
                                 *self.security_args)

    async def run(self, adopt_pid: int = 0) -> None:
        """Keeps a proxy running until cancelled (first the one at adopt_pid, if it is still alive and
        serves this head); stops it in finally."""
        backoff = Backoff(FIRST_BACKOFF, MAX_BACKOFF, stable_s=STABLE_SECONDS)
        try:
            while not self._stopping:
                started = time.monotonic()
                pid, adopt_pid = adopt_pid, 0
                code = await (self._watch_adopted(pid) if pid and await self._adoptable(pid) else self._run_once())
                if self._stopping:
                    break
                ran = time.monotonic() - started
                delay = backoff.next_delay(ran)
                self.restarts += 1
                event(log, "proxy_exited", logging.WARNING, code=code, ran_s=f"{ran:.1f}",
                      restart_in_s=f"{delay:.2f}", restarts=self.restarts)
                self.on_change(self.address, 0, self.restarts)
                await asyncio.sleep(delay)
        finally:
            await self.stop()

    async def _run_once(self) -> int | None:
        self.port_file.unlink(missing_ok=True)
        # Its own process group: a terminal's Ctrl-C reaches the head, which stops the proxy in order.
        self.proc = await asyncio.create_subprocess_exec(*self.command(), stdin=asyncio.subprocess.DEVNULL,
                                                         process_group=0)
        event(log, "proxy_started", pid=self.proc.pid, host=self.host, port=self.port, head=self.head_address)
        self.on_change(self.address, self.proc.pid, self.restarts)
        waiter = asyncio.create_task(self.proc.wait())
        try:
            while not waiter.done():
                port = read_port_file(self.port_file)
                if port is not None:
                    self._bound(port)
                    break
                await asyncio.wait({waiter}, timeout=PORT_FILE_POLL)
            return await waiter
        finally:
            waiter.cancel()

    async def _adoptable(self, pid: int) -> bool:
        """True for a live proxy of this head (same --head) with a known port; one that dials another
        head address is stopped (it holds the HTTP port a fresh one needs)."""
        argv = proxy_cmdline(pid)
        port = read_port_file(self.port_file)
        head = argv[argv.index("--head") + 1] if "--head" in argv[:-1] else ""
        if argv and port is not None and head == self.head_address:
            return True
        if argv:
            event(log, "proxy_not_adopted", logging.WARNING, pid=pid, reason="serves another head or lost its port")
            await _stop_pid(pid, 5.0)
        return False

    async def _watch_adopted(self, pid: int) -> None:
        """Supervises a proxy the previous head left running until it exits (no exit code: not our child)."""
        self.adopted_pid = pid
        event(log, "proxy_adopted", pid=pid)
        self._bound(read_port_file(self.port_file) or self.port)
        while proxy_cmdline(pid):  # cancelled here, adopted_pid stays set so that stop() stops it
            await asyncio.sleep(ADOPTED_POLL)
        self.adopted_pid = 0

    def _bound(self, port: int) -> None:
        self.port = port  # restarts reuse the port first bound
        self.address = f"{display_host(self.host)}:{port}"
        pid = self.proc.pid if self.proc else self.adopted_pid
        event(log, "proxy_listening", pid=pid, address=self.address)
        self.on_change(self.address, pid, self.restarts)

    async def stop(self) -> None:
        self._stopping = True
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            code = await stop_async(proc, grace=5.0)
            event(log, "proxy_stopped", pid=proc.pid, code=code)
        pid, self.adopted_pid = self.adopted_pid, 0
        if pid:
            await _stop_pid(pid, 5.0)
            event(log, "proxy_stopped", pid=pid, adopted=True)


async def _stop_pid(pid: int, grace: float) -> None:
    """SIGTERM a proxy that is not our child, poll until it is gone, SIGKILL after grace."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while proxy_cmdline(pid) and time.monotonic() < deadline:
            await asyncio.sleep(ADOPTED_POLL)
        if not proxy_cmdline(pid):
            return
