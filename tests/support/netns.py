"""Several test hosts on one machine: a network namespace each, cabled to a bridge in a 'lan' namespace.

Everything lives inside namespaces this test run creates (the bridge too), so no address is ever
configured in, or routed from, the machine's own network. Needs root (CAP_NET_ADMIN)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess


def can_make_namespaces() -> str:
    """Empty when this process can build namespaces; otherwise why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if not shutil.which("ip"):
        return "needs the `ip` command (iproute2)"
    return ""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


class NetLab:
    """Hosts named by the caller, each `subnet.N/24`, all on one switch; links can be cut and restored."""

    def __init__(self, subnet: str = "10.231.7"):
        self.tag = "gs" + secrets.token_hex(2)
        self.subnet = subnet
        self.lan = f"{self.tag}-lan"
        self.hosts: dict[str, str] = {}
        self.procs: list[subprocess.Popen] = []
        sh("ip", "netns", "add", self.lan)
        sh("ip", "-n", self.lan, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.lan, "link", "set", "br0", "up")

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def add_host(self, host: str) -> str:
        """Creates a namespace with eth0 cabled to the switch; returns its address."""
        ip = f"{self.subnet}.{len(self.hosts) + 1}"
        ns, port = self.ns(host), f"v{len(self.hosts) + 1}-{self.tag}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.lan)
        sh("ip", "-n", self.lan, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.hosts[host] = port
        return ip

    def set_link(self, host: str, up: bool) -> None:
        """Unplugs (or plugs back) the host's cable at the switch."""
        sh("ip", "-n", self.lan, "link", "set", self.hosts[host], "up" if up else "down")

    def run(self, host: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *cmd], **kw)

    def popen(self, host: str, *cmd: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def teardown(self) -> None:
        """Stops every process started here, then deletes every namespace (best effort, always)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    with_suppressed(os.killpg, proc.pid, signal.SIGKILL)
        for host in self.hosts:
            for pid in subprocess.run(["ip", "netns", "pids", self.ns(host)], capture_output=True,
                                      text=True).stdout.split():
                with_suppressed(os.kill, int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.lan], capture_output=True)


def with_suppressed(fn, *args) -> None:
    try:
        fn(*args)
    except (ProcessLookupError, PermissionError):
        pass
