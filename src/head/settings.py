"""The head's settings: a validated HeadConfig built from its command-line flags."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from gridserve.common.model_config import DEFAULT_MODEL_CONFIGS
from gridserve.common.errors import ConfigError
from gridserve.common.api_key_files import (KeyLimits, add_admin_key_args, add_api_key_args, admin_keys_from_args,
                                               keys_from_args, limits_from_args)
from gridserve.common.security import Security, add_security_args, security_from_args

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class HeadConfig:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    state_dir: Path = Path(".gridserve/state")
    model_configs: Path = DEFAULT_MODEL_CONFIGS
    proxy: bool = True
    node_timeout: float = 10.0
    reconcile_interval: float = 1.0
    max_replicas: int = 64  # the most replicas one deployment may ask for
    log_level: str = "INFO"
    api_keys: tuple[str, ...] = ()  # handed to the proxy in a 0600 file under state_dir, never on argv
    api_key_limits: dict[str, KeyLimits] = field(default_factory=dict)  # key -> rate limits, in that file too
    admin_keys: tuple[str, ...] = ()  # the dashboard's admin credential, handed over the same way
    security: Security = Security()  # always has a token: the head makes one in state_dir if none is given

    def __post_init__(self) -> None:
        for name, port in (("--grpc-port", self.grpc_port), ("--http-port", self.http_port)):
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name}: must be a port in 0..65535 (0 picks a free one), got {port}")
        if not self.host:
            raise ConfigError("--host: must not be empty")
        if not 1.0 <= self.node_timeout <= 3600:
            raise ConfigError(f"--node-timeout: must be between 1 and 3600 seconds, got {self.node_timeout:g}")
        if not 0.05 <= self.reconcile_interval <= 60:
            raise ConfigError(f"--reconcile-interval: must be between 0.05 and 60 seconds, "
                              f"got {self.reconcile_interval:g}")
        if not 1 <= self.max_replicas <= 1_000_000:
            raise ConfigError(f"--max-replicas: must be between 1 and 1000000, got {self.max_replicas}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level}")

    @property
    def local_host(self) -> str:
        """The address the head's own children (the proxy) use to reach its gRPC server."""
        return "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gridserve head",
        description="The head controller: deployments, node registry, placement, routing tables; "
                    "starts and supervises the HTTP proxy.")
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind address (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port, 0 picks a free one (default 50051)")
    p.add_argument("--http-host", default="127.0.0.1", help="the proxy's HTTP bind address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the proxy's HTTP port, 0 picks a free one (default 8000)")
    p.add_argument("--state-dir", type=Path, default=Path(".gridserve/state"),
                   help="where state.db, head.json and proxy.port live (default ./.gridserve/state)")
    p.add_argument("--model-configs", type=Path, default=DEFAULT_MODEL_CONFIGS,
                   help="the model catalog (default: the repo's model_configs.json)")
    p.add_argument("--no-proxy", dest="proxy", action="store_false", help="do not start the HTTP proxy")
    p.add_argument("--node-timeout", type=float, default=10.0,
                   help="seconds without a report before a node is marked dead (default 10); "
                        "after a head restart nodes get twice this to reconnect")
    p.add_argument("--reconcile-interval", type=float, default=1.0,
                   help="seconds between periodic reconcile passes (default 1)")
    p.add_argument("--max-replicas", type=int, default=64,
                   help="the most replicas one deployment may ask for (default 64; a head simulated at scale "
                        "takes e.g. 10000)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    add_api_key_args(p)
    add_admin_key_args(p)
    add_security_args(p)
    return p


def parse_config(argv: list[str] | None = None) -> HeadConfig:
    """Flags -> HeadConfig; argparse errors exit 2, a bad value raises ConfigError naming the flag."""
    args = build_parser().parse_args(argv)
    keys, limits, admin_keys = keys_from_args(args), limits_from_args(args), admin_keys_from_args(args)
    security = security_from_args(args, state_dir=args.state_dir, create=True)
    for name in ("api_key", "api_key_file", "cluster_token", "cluster_token_file", "tls_cert", "tls_key", "tls_ca",
                 "admin_key_file"):
        delattr(args, name)
    return HeadConfig(**vars(args), api_keys=keys, api_key_limits=limits, admin_keys=admin_keys, security=security)
