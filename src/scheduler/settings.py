"""The scheduler's settings: a validated SchedulerConfig built from its command-line flags."""
from __future__ import annotations

import argparse
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from gridserve.common.model_config import parse_hostport
from gridserve.common.errors import ConfigError
from gridserve.common.procs import python_module_cmd
from gridserve.common.security import Security, add_security_args, security_from_args

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class SchedulerConfig:
    head: str
    node_id: str
    num_cpus: float
    num_gpus: float = 0.0
    memory_bytes: int = 0
    host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    work_dir: Path = Path(".gridserve/node")
    replica_command: tuple[str, ...] = field(default_factory=lambda: tuple(python_module_cmd("gridserve.replica")))
    cache_dir: str = ""
    report_interval: float = 1.0
    probe_interval: float = 1.0
    probe_timeout: float = 2.0  # a health probe unanswered this long has failed
    stop_grace: float = 10.0
    drain_grace: float = 30.0  # a replica being stopped gets this long to finish its streams before SIGTERM
    unhealthy_grace: float = 10.0  # a replica UNHEALTHY (or NOT_SERVING after READY) this long is killed
    log_level: str = "INFO"
    port_range: tuple[int, int] = (0, 0)  # replica ports; (0, 0): any free port
    security: Security = field(default=Security(), repr=False)
    proxy_port: int = -1               # >= 0: run an HTTP proxy beside the scheduler on this port (0: any)
    proxy_host: str = ""               # where that proxy listens (default: --host)
    proxy_api_key_files: tuple[str, ...] = ()  # its API keys (give every proxy the head's keys file)
    threads_per_replica: int = 0       # torch threads of each replica; 0: its share of the node (see replica_threads)

    def __post_init__(self) -> None:
        parse_hostport(self.head)
        if not -1 <= self.proxy_port <= 65535:
            raise ConfigError(f"--proxy-port: must be a port in 0..65535 (0 picks a free one), got {self.proxy_port}")
        if not self.node_id or any(c.isspace() for c in self.node_id):
            raise ConfigError(f"--node-id: must be a non-empty name without spaces, got {self.node_id!r}")
        if not 0 < self.num_cpus <= 4096:
            raise ConfigError(f"--num-cpus: must be a number in (0, 4096], got {self.num_cpus:g}")
        if not 0 <= self.num_gpus <= 256:
            raise ConfigError(f"--num-gpus: must be a number in [0, 256], got {self.num_gpus:g}")
        if not self.replica_command:
            raise ConfigError("--replica-command: must not be empty")
        if not 0 <= self.threads_per_replica <= 4096:
            raise ConfigError(f"--threads-per-replica: must be 0 (automatic) to 4096, got {self.threads_per_replica}")
        for name, value, lo, hi in (("--report-interval", self.report_interval, 0.05, 60),
                                    ("--probe-interval", self.probe_interval, 0.05, 60),
                                    ("--probe-timeout", self.probe_timeout, 0.05, 60),
                                    ("--stop-grace", self.stop_grace, 0.1, 600),
                                    ("--unhealthy-grace", self.unhealthy_grace, 0.5, 3600),
                                    ("--drain-grace", self.drain_grace, 0, 3600)):
            if not lo <= value <= hi:
                raise ConfigError(f"{name}: must be between {lo:g} and {hi:g} seconds, got {value:g}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level}")
        lo, hi = self.port_range
        if (lo, hi) != (0, 0) and not 1024 <= lo <= hi <= 65535:
            raise ConfigError(f"--port-range: must be LOW-HIGH within 1024..65535, got {lo}-{hi}")

    @property
    def probe_host(self) -> str:
        """Where this machine reaches its own replicas for health probes."""
        return "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host


def route_address_to(host: str, port: int) -> str:
    """The local address of the route to host:port (UDP connect sends nothing); 127.0.0.1 if none."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gridserve scheduler",
        description="One per machine: registers with the head, runs the replicas it is given, reports them.")
    p.add_argument("--head", default="127.0.0.1:50051", help="the head's gRPC address (default 127.0.0.1:50051)")
    p.add_argument("--node-id", default="", help="this node's name (default: the hostname)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs the head may place (default: all logical CPUs)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs the head may place (default 0)")
    p.add_argument("--threads-per-replica", type=int, default=0,
                   help="torch threads of each replica (default 0: the CPUs its model reserves, or its even share "
                        "of --num-cpus when more; set 1 when several schedulers share one machine's cores)")
    p.add_argument("--host", default="",
                   help="bind address of the replicas (default: the advertised address)")
    p.add_argument("--advertise-host", default="",
                   help="address the proxy reaches the replicas at (default: --host if it is a specific "
                        "address, else the local address of the route to the head)")
    p.add_argument("--port-range", default="", metavar="LOW-HIGH",
                   help="ports replicas listen on, for firewalls (default: any free port)")
    p.add_argument("--work-dir", type=Path, default=Path(".gridserve/node"),
                   help="replica logs and port files go here (default ./.gridserve/node)")
    p.add_argument("--cache-dir", default="", help="passed to replicas as --cache-dir (model download cache)")
    p.add_argument("--replica-command", default="",
                   help="command that starts a replica, before its flags (default: python -m gridserve.replica)")
    p.add_argument("--report-interval", type=float, default=1.0, help="seconds between heartbeats (default 1)")
    p.add_argument("--probe-interval", type=float, default=1.0,
                   help="seconds between health probes of a READY replica (default 1)")
    p.add_argument("--probe-timeout", type=float, default=2.0,
                   help="seconds a health probe may take before it counts as failed; 3 failures in a row mark a "
                        "replica UNHEALTHY (default 2)")
    p.add_argument("--stop-grace", type=float, default=10.0,
                   help="seconds a replica gets to exit after SIGTERM before SIGKILL (default 10)")
    p.add_argument("--drain-grace", type=float, default=30.0,
                   help="seconds a replica that is scaled away or undeployed gets to finish its in-flight streams "
                        "(it is out of the routes already) before SIGTERM and --stop-grace (default 30)")
    p.add_argument("--unhealthy-grace", type=float, default=10.0,
                   help="seconds a replica may stay UNHEALTHY (or NOT_SERVING after it was READY) before it is "
                        "killed and restarted as hung (default 10)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    g = p.add_argument_group("a proxy on this node (clients can then use this node's address)")
    g.add_argument("--proxy-port", type=int, default=-1,
                   help="run an HTTP proxy beside the scheduler on this port, supervised by it (0: any free port; "
                        "default: no proxy)")
    g.add_argument("--proxy-host", default="", help="where that proxy listens (default: --host)")
    g.add_argument("--proxy-api-key-file", action="append", default=[], metavar="PATH",
                   help="API keys of that proxy (the head's keys file, copied to this machine); repeatable")
    add_security_args(p)
    return p


def parse_port_range(text: str) -> tuple[int, int]:
    if not text:
        return (0, 0)
    lo, sep, hi = text.partition("-")
    if not (sep and lo.strip().isdigit() and hi.strip().isdigit()):
        raise ConfigError(f"--port-range: expected LOW-HIGH, e.g. 41000-41099, got {text!r}")
    return int(lo), int(hi)


def parse_config(argv: list[str] | None = None) -> SchedulerConfig:
    """Flags -> SchedulerConfig, filling machine defaults (CPU count, memory, advertise address)."""
    a = build_parser().parse_args(argv)
    head_host, head_port = parse_hostport(a.head)
    advertise = a.advertise_host or (a.host if a.host not in WILDCARD_HOSTS else route_address_to(head_host, head_port))
    host = a.host or advertise  # nothing assumes 127.0.0.1: bind where others are told to connect
    command = tuple(shlex.split(a.replica_command)) if a.replica_command else None
    extra = {"replica_command": command} if command else {}
    return SchedulerConfig(
        head=a.head, node_id=a.node_id or socket.gethostname(),
        num_cpus=float(a.num_cpus if a.num_cpus is not None else (psutil.cpu_count() or 1)),
        num_gpus=a.num_gpus, memory_bytes=psutil.virtual_memory().total, host=host, advertise_host=advertise,
        work_dir=a.work_dir, cache_dir=a.cache_dir, report_interval=a.report_interval,
        probe_interval=a.probe_interval, probe_timeout=a.probe_timeout, stop_grace=a.stop_grace,
        drain_grace=a.drain_grace, unhealthy_grace=a.unhealthy_grace, log_level=a.log_level,
        port_range=parse_port_range(a.port_range), security=security_from_args(a), proxy_port=a.proxy_port,
        proxy_host=a.proxy_host or host, proxy_api_key_files=tuple(a.proxy_api_key_file),
        threads_per_replica=a.threads_per_replica, **extra)
