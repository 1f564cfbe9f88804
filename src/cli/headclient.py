"""The CLI's calls to the head's AdminService: every failure becomes one CliError line, never a traceback."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from gridserve.common.security import Security, call_metadata

DEFAULT_HEAD = "127.0.0.1:50051"
DEFAULT_STATE_DIR = ".gridserve/state"
RPC_TIMEOUT = 10.0
PING_TIMEOUT = 5.0


class CliError(Exception):
    """A failure to show as one line on stderr, exit code 1."""


@dataclass(frozen=True)
class Head:
    """Where the head is and what calls to it carry (the cluster token, TLS)."""
    address: str
    security: Security = field(default=Security(), repr=False)

    def __str__(self) -> str:
        return self.address

    def channel(self):
        import grpc

        from gridserve.common.security import channel_credentials

        creds = channel_credentials(self.security)
        return grpc.secure_channel(self.address, creds) if creds else grpc.insecure_channel(self.address)

    @property
    def metadata(self) -> tuple:
        return call_metadata(self.security)


def _error(e, head: Head) -> CliError:
    import grpc

    code, details = e.code(), e.details() or str(e.code())
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(f"cannot reach the head at {head}: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"the head at {head} refused the call: {details}")
    return CliError(f"error: {details}")


def call_head(head: Head, method: str, request):
    """One unary AdminService call; a head that cannot be reached or an RPC error becomes a CliError."""
    import grpc

    from gridserve.v1 import head_pb2_grpc

    ch = head.channel()
    try:
        return getattr(head_pb2_grpc.AdminServiceStub(ch), method)(request, timeout=RPC_TIMEOUT,
                                                                   metadata=head.metadata)
    except grpc.RpcError as e:
        raise _error(e, head) from None
    finally:
        ch.close()


def stream_logs(head: Head, request) -> Iterator[bytes]:
    """AdminService.Logs: the pieces of a replica's log as the head relays them. The head is pinged first,
    so a head that is down is told apart from a node that is (both are UNAVAILABLE)."""
    import grpc

    from gridserve.v1 import head_pb2, head_pb2_grpc

    ch = head.channel()
    try:
        stub = head_pb2_grpc.AdminServiceStub(ch)
        try:
            stub.Models(head_pb2.ModelsRequest(), timeout=PING_TIMEOUT, metadata=head.metadata)
        except grpc.RpcError as e:
            raise _error(e, head) from None
        try:
            for piece in stub.Logs(request, metadata=head.metadata):
                yield piece.data
        except grpc.RpcError as e:
            raise CliError(f"error: {e.details() or e.code()}") from None
    finally:
        ch.close()
