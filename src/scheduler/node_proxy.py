"""A proxy on this node beside the scheduler (`--proxy-port`): started, restarted when it exits, adopted after
a scheduler restart, and stopped with the scheduler; clients can use any node's address."""
from __future__ import annotations

import logging
from pathlib import Path

from gridserve.common.eventlog import event
from gridserve.common.files import write_atomic
from gridserve.common.security import Security
from gridserve.common.proxy_supervisor import ProxySupervisor, proxy_cmdline

log = logging.getLogger("gridserve.scheduler.proxy")


def child_security(security: Security, run_dir: Path) -> list[str]:
    """The flags that give the proxy the cluster's token and TLS; a token given inline is written to a 0600
    file first (never on the proxy's argv)."""
    args = security.child_args()
    if security.token and not security.token_file:
        path = run_dir / "cluster-token"
        write_atomic(path, security.token + "\n", private=True)
        args = ["--cluster-token-file", str(path), *args]
    return args


class NodeProxy:
    """The ProxySupervisor the head uses for its own proxy, with its port and pid files in `run_dir`."""

    def __init__(self, head: str, host: str, port: int, run_dir: Path, security: Security,
                 api_key_files: tuple[str, ...] = ()):
        self.pid_file = run_dir / "proxy.pid"
        self.address = ""
        extra = [a for f in api_key_files for a in ("--api-key-file", f)]
        self.supervisor = ProxySupervisor(head, host, port, run_dir / "proxy.port", self._changed,
                                          security_args=[*extra, *child_security(security, run_dir)])

    def _changed(self, address: str, pid: int, restarts: int) -> None:
        self.address = address
        if pid:
            write_atomic(self.pid_file, f"{pid}\n")
        event(log, "node_proxy", address=address, pid=pid, restarts=restarts)

    def _previous_pid(self) -> int:
        """A proxy a previous scheduler of this work dir left running (killed with SIGKILL), to adopt."""
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return 0
        return pid if proxy_cmdline(pid) else 0

    async def run(self) -> None:
        await self.supervisor.run(adopt_pid=self._previous_pid())
