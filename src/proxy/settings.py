"""The proxy's settings: a validated dataclass built from its command-line flags."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from gridserve.common.model_config import parse_hostport
from gridserve.common.errors import ConfigError
from gridserve.common.api_key_files import (KeyLimits, add_admin_key_args, add_api_key_args, admin_keys_from_args,
                                               keys_from_args, limits_from_args)
from gridserve.common.security import Security, add_security_args, security_from_args
from gridserve.proxy.replica_picker import ROUTINGS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class ProxyConfig:
    head: str                        # host:port of the head's gRPC server
    host: str = "127.0.0.1"
    port: int = 8000                 # 0 picks a free port
    port_file: str = ""              # where to write the bound port once listening
    log_level: str = "INFO"
    max_body_bytes: int = 1024 * 1024
    retry_attempts: int = 3          # replicas tried before the first token
    retry_deadline_s: float = 10.0
    accept_timeout_s: float = 5.0    # per attempt: how long a replica may take to admit a request
    max_failovers: int = 3           # mid-stream moves to another replica per request (0: none)
    shutdown_grace_s: float = 5.0    # how long open streams may finish on SIGTERM
    metrics_interval_s: float = 5.0  # how often /metrics' cluster gauges are refreshed from the head
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: /v1/* is open
    api_key_limits: dict[str, KeyLimits] = field(default_factory=dict, repr=False)  # key -> its rate limits
    zero_hold_timeout_s: float = 60.0  # how long a request for a model at zero replicas waits for one
    zero_hold_max: int = 100           # requests per model held at once; more get 503 at once
    routing: str = "prefix"            # "prefix": cache-aware over p2c; "p2c": the power of two choices alone
    admin_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: dashboard actions are refused
    security: Security = field(default=Security(), repr=False)  # cluster token and TLS for gRPC calls

    def __post_init__(self) -> None:
        parse_hostport(self.head)
        if not self.host:
            raise ConfigError("--host: must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port: must be in 0..65535, got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes: must be >= 1024, got {self.max_body_bytes}")
        if self.retry_attempts < 1:
            raise ConfigError(f"--retry-attempts: must be >= 1, got {self.retry_attempts}")
        if self.retry_deadline_s <= 0 or self.shutdown_grace_s < 0:
            raise ConfigError("--retry-deadline must be > 0 and --shutdown-grace >= 0")
        if not self.accept_timeout_s > 0:
            raise ConfigError(f"--accept-timeout: must be > 0 seconds, got {self.accept_timeout_s:g}")
        if self.max_failovers < 0:
            raise ConfigError(f"--max-failovers: must be >= 0, got {self.max_failovers}")
        if not self.zero_hold_timeout_s > 0 or self.zero_hold_max < 1:
            raise ConfigError("--zero-hold-timeout must be > 0 seconds and --zero-hold-max >= 1")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"--routing: must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if not 0.5 <= self.metrics_interval_s <= 300:
            raise ConfigError(f"--metrics-interval: must be between 0.5 and 300 seconds, "
                              f"got {self.metrics_interval_s:g}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gridserve proxy", description="gridserve HTTP proxy (the front door)")
    p.add_argument("--head", required=True, help="the head's gRPC address, HOST:PORT")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port, 0 picks a free one (default 8000)")
    p.add_argument("--port-file", default="", help="write the bound port here once listening")
    p.add_argument("--log-level", default="INFO", type=str.upper, help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--max-body-bytes", type=int, default=1024 * 1024,
                   help="larger bodies (counted after gzip/deflate decoding) get 413")
    p.add_argument("--retry-attempts", type=int, default=3, help="replicas tried before the first token")
    p.add_argument("--retry-deadline", type=float, default=10.0, help="seconds spent retrying at most")
    p.add_argument("--accept-timeout", type=float, default=5.0,
                   help="seconds a replica may take to admit a request before the next one is tried (default 5)")
    p.add_argument("--max-failovers", type=int, default=3,
                   help="times a stream may move to another replica after its first token (default 3, 0: never)")
    p.add_argument("--zero-hold-timeout", type=float, default=60.0,
                   help="seconds a request for a model scaled to zero waits for its first replica before 503 "
                        "(default 60)")
    p.add_argument("--zero-hold-max", type=int, default=100,
                   help="requests per model held at once while it starts from zero; more get 503 (default 100)")
    p.add_argument("--routing", default="prefix", type=str.lower,
                   help="how a replica is picked: prefix (a prompt goes back to the replica that served its "
                        "prefix, within a load bound, else p2c) or p2c (the power of two choices on in-flight "
                        "streams alone) (default prefix)")
    p.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds open streams get on SIGTERM")
    p.add_argument("--metrics-interval", type=float, default=5.0,
                   help="seconds between polls of the head and replicas for /metrics' cluster gauges and the "
                        "dashboard (every second while a dashboard page is open)")
    add_api_key_args(p)
    add_admin_key_args(p)
    add_security_args(p)
    return p


def parse_config(argv: list[str] | None = None) -> ProxyConfig:
    """Flags to a ProxyConfig; a bad value exits with argparse's usage message (code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ProxyConfig(head=args.head, host=args.host, port=args.port, port_file=args.port_file,
                           log_level=args.log_level, max_body_bytes=args.max_body_bytes,
                           retry_attempts=args.retry_attempts, retry_deadline_s=args.retry_deadline,
                           accept_timeout_s=args.accept_timeout, max_failovers=args.max_failovers,
                           shutdown_grace_s=args.shutdown_grace, metrics_interval_s=args.metrics_interval,
                           zero_hold_timeout_s=args.zero_hold_timeout, zero_hold_max=args.zero_hold_max,
                           routing=args.routing,
                           api_keys=keys_from_args(args), api_key_limits=limits_from_args(args),
                           admin_keys=admin_keys_from_args(args),
                           security=security_from_args(args))
    except ConfigError as e:
        parser.error(e.message)
