"""Validated settings of one replica process, built from its command-line flags."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import ConfigError
from gridserve.common.model_config_proto import config_from_arg
from gridserve.common.security import Security, add_security_args, security_from_args

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SHUTDOWN_GRACE_S = 5.0  # how long in-flight streams may finish after SIGTERM before they are cancelled
FAULT_INJECTION_ENV = "GRIDSERVE_FAULT_INJECTION"  # "1": SIGUSR1 wedges the engine, SIGUSR2 leaks memory (tests only)


@dataclass(frozen=True)
class ReplicaConfig:
    replica_id: str
    model: ModelConfig
    host: str
    port: int
    port_file: Path | None
    num_threads: int
    cache_dir: Path
    log_level: str = "INFO"
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    security: Security = field(default=Security(), repr=False)  # cluster token and TLS of its gRPC server
    fault_injection: bool = False  # from GRIDSERVE_FAULT_INJECTION=1: SIGUSR1 wedges the engine thread

    def __post_init__(self) -> None:
        if not self.replica_id.strip():
            raise ConfigError("--replica-id: must be a non-empty string")
        if not self.host:
            raise ConfigError("--host: must be a non-empty host name or address")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: must be in 0..65535 (0 picks a free port), got {self.port}")
        if self.num_threads < 1:
            raise ConfigError(f"--num-threads: must be >= 1, got {self.num_threads}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/gridserve or ~/.cache/gridserve, read when called."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gridserve"


def fault_injection_from_env() -> bool:
    """GRIDSERVE_FAULT_INJECTION, read when called: "1" on, unset, "" or "0" off, anything else a ConfigError."""
    value = os.environ.get(FAULT_INJECTION_ENV, "")
    if value not in ("", "0", "1"):
        raise ConfigError(f"{FAULT_INJECTION_ENV}: must be 1 (on) or 0 (off), got {value!r}")
    return value == "1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gridserve.replica",
                                description="Serve one model over gRPC (Generate, Info, grpc.health.v1).")
    p.add_argument("--replica-id", required=True, help="this replica's id, '<model>-<6 hex>'")
    p.add_argument("--model-config", required=True,
                   help="the model's config: base64 of a serialized gridserve.v1.ModelConfig (the scheduler "
                        "passes it; gridserve.common.model_config_proto.config_to_arg makes one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default 0)")
    p.add_argument("--port-file", help="write the bound port here (atomically) once bound")
    p.add_argument("--num-threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--cache-dir", help="converted-model cache (default $XDG_CACHE_HOME/gridserve "
                                       "or ~/.cache/gridserve)")
    p.add_argument("--log-level", default="INFO", type=str.upper, help="DEBUG, INFO, WARNING or ERROR")
    add_security_args(p)
    return p


def parse_config(argv: list[str] | None = None) -> ReplicaConfig:
    """Flags to a ReplicaConfig; ConfigError (naming the flag or field) when something is wrong."""
    args = build_parser().parse_args(argv)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    return ReplicaConfig(
        replica_id=args.replica_id,
        model=config_from_arg(args.model_config),
        host=args.host, port=args.port,
        port_file=Path(args.port_file) if args.port_file else None,
        num_threads=args.num_threads, cache_dir=cache_dir,
        log_level=args.log_level,
        security=security_from_args(args),
        fault_injection=fault_injection_from_env(),
    )
