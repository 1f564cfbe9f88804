"""Cluster security: the shared cluster token every gRPC call carries, and optional TLS."""
from __future__ import annotations

import argparse
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from gridserve.common.errors import ConfigError
from gridserve.common.eventlog import event
from gridserve.common.files import write_atomic
from gridserve.common.paths import StateDir

log = logging.getLogger("gridserve.security")
METADATA_KEY = "x-gridserve-token"
# Open without a token: standard health probes (load balancers, orchestrators) change nothing.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class Security:
    """What a process needs to talk to the cluster: the token, and TLS files when TLS is on."""
    token: str = ""
    token_file: str = ""  # where the token came from, to hand it to children without putting it on argv
    tls_cert_path: str = ""
    tls_key_path: str = ""
    tls_ca_path: str = ""
    tls_cert: bytes = b""
    tls_key: bytes = b""
    tls_ca: bytes = b""

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def child_args(self) -> list[str]:
        """Flags that hand the same security to a child process (the token by file, never on argv)."""
        args = ["--cluster-token-file", self.token_file] if self.token_file else []
        for flag, path in (("--tls-cert", self.tls_cert_path), ("--tls-key", self.tls_key_path),
                           ("--tls-ca", self.tls_ca_path)):
            if path:
                args += [flag, path]
        return args


def add_security_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster security")
    g.add_argument("--cluster-token", default=None,
                   help="shared secret every gRPC call in the cluster carries (prefer --cluster-token-file: "
                        "a flag is visible in `ps`)")
    g.add_argument("--cluster-token-file", default=None, help="file holding the cluster token")
    g.add_argument("--tls-cert", default=None, help="PEM certificate of this process (enables TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    g.add_argument("--tls-ca", default=None, help="PEM CA bundle that signs the cluster's certificates")


def _read(path: str | None, what: str) -> bytes:
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


def read_token_file(path: str | Path) -> str:
    token = _read(str(path), "--cluster-token-file").decode(errors="replace").strip()
    if not token:
        raise ConfigError(f"--cluster-token-file {path}: the file is empty")
    return token


def write_token_file(path: Path, token: str) -> None:
    """Writes the token readable by its owner only (0600), atomically."""
    write_atomic(path, token + "\n", private=True)


def security_from_args(args: argparse.Namespace, state_dir: Path | None = None,
                       create: bool = False) -> Security:
    """Builds Security from the flags. With neither token flag, look in state_dir (the head's, on its own
    machine). `create` (the head) makes a new token there when none exists yet, and writes a token
    given by value there too, so its children and tools on its machine read it from a file."""
    token, token_file = "", ""
    if args.cluster_token and args.cluster_token_file:
        raise ConfigError("give --cluster-token or --cluster-token-file, not both")
    if args.cluster_token:
        token = args.cluster_token.strip()
        if create and state_dir is not None and len(token) >= 16:
            token_file = str(StateDir(state_dir).cluster_token.resolve())
            write_token_file(Path(token_file), token)
    elif args.cluster_token_file:
        token, token_file = read_token_file(args.cluster_token_file), str(Path(args.cluster_token_file).resolve())
    elif state_dir is not None:
        path = StateDir(state_dir).cluster_token
        if path.exists():
            token, token_file = read_token_file(path), str(path.resolve())
        elif create:
            token, token_file = secrets.token_urlsafe(32), str(path.resolve())
            write_token_file(path, token)
            event(log, "cluster_token_created", path=token_file)
    if token and len(token) < 16:
        raise ConfigError("the cluster token must be at least 16 characters")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    paths = {k: str(Path(v).resolve()) if v else "" for k, v in
             (("cert", args.tls_cert), ("key", args.tls_key), ("ca", args.tls_ca))}
    return Security(token=token, token_file=token_file,
                    tls_cert_path=paths["cert"], tls_key_path=paths["key"], tls_ca_path=paths["ca"],
                    tls_cert=_read(args.tls_cert, "--tls-cert"), tls_key=_read(args.tls_key, "--tls-key"),
                    tls_ca=_read(args.tls_ca, "--tls-ca"))


# server side

class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the cluster token (UNAUTHENTICATED), in constant time, and logs it."""

    def __init__(self, token: str):
        self._token = token.encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get(METADATA_KEY, "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._token):
            return await continuation(details)
        event(log, "unauthenticated_call", logging.WARNING, method=details.method,
              reason="no token" if not given else "wrong token")
        return _deny(await continuation(details))


def _deny(handler):
    """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED."""
    msg = "missing or wrong cluster token (pass --cluster-token-file, or run where the head's state dir is)"

    async def abort_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

    async def abort_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort_unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort_unary, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(abort_stream, handler.request_deserializer,
                                                 handler.response_serializer)


def server_credentials(sec: Security) -> grpc.ServerCredentials | None:
    if not sec.tls_cert:
        return None
    return grpc.ssl_server_credentials([(sec.tls_key, sec.tls_cert)], root_certificates=sec.tls_ca or None,
                                       require_client_auth=False)


# client side

def call_metadata(sec: Security | None) -> tuple:
    return ((METADATA_KEY, sec.token),) if sec and sec.token else ()


class _TokenMetadata:
    """Adds the cluster token to the call's metadata."""

    def __init__(self, token: str):
        self._md = (METADATA_KEY, token)

    def _details(self, d):
        md = grpc.aio.Metadata(*(d.metadata or ()), self._md)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)


# grpc.aio files an interceptor under the first call kind it implements, so one class per kind.
class _UnaryUnary(_TokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_TokenMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def client_interceptors(sec: Security | None) -> list:
    """Interceptors that put the cluster token on every unary-request call of an aio channel.

    Calls that stream requests (the node Session) pass call_metadata() themselves: grpc.aio's
    stream-request interceptors route writes through a queue whose consumer task is left pending
    when the call is cancelled (seen as "Task was destroyed but it is pending" and "aclose():
    asynchronous generator is already running" on every reconnect of a scheduler)."""
    if not (sec and sec.token):
        return []
    return [kind(sec.token) for kind in (_UnaryUnary, _UnaryStream)]


def channel_credentials(sec: Security) -> grpc.ChannelCredentials | None:
    if not sec.tls:
        return None
    return grpc.ssl_channel_credentials(root_certificates=sec.tls_ca or None,
                                        private_key=sec.tls_key or None, certificate_chain=sec.tls_cert or None)
