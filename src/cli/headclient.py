"""The CLI's calls to the head's AdminService: every failure becomes one CliError line, never a traceback."""
from __future__ import annotations

from typing import Iterator

DEFAULT_HEAD = "127.0.0.1:50051"
RPC_TIMEOUT = 10.0
PING_TIMEOUT = 5.0


class CliError(Exception):
    """A failure to show as one line on stderr, exit code 1."""


def _error(e, head: str) -> CliError:
    import grpc

    code, details = e.code(), e.details() or str(e.code())
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(f"cannot reach the head at {head}: {details}")
    return CliError(f"error: {details}")


def call_head(head: str, method: str, request):
    """One unary AdminService call; a head that cannot be reached or an RPC error becomes a CliError."""
    import grpc

    from gridserve.v1 import head_pb2_grpc

    ch = grpc.insecure_channel(head)
    try:
        return getattr(head_pb2_grpc.AdminServiceStub(ch), method)(request, timeout=RPC_TIMEOUT)
    except grpc.RpcError as e:
        raise _error(e, head) from None
    finally:
        ch.close()


def stream_logs(head: str, request) -> Iterator[bytes]:
    """AdminService.Logs: the pieces of a replica's log as the head relays them. The head is pinged first,
    so a head that is down is told apart from a node that is (both are UNAVAILABLE)."""
    import grpc

    from gridserve.v1 import head_pb2, head_pb2_grpc

    ch = grpc.insecure_channel(head)
    try:
        stub = head_pb2_grpc.AdminServiceStub(ch)
        try:
            stub.Models(head_pb2.ModelsRequest(), timeout=PING_TIMEOUT)
        except grpc.RpcError as e:
            raise _error(e, head) from None
        try:
            for piece in stub.Logs(request):
                yield piece.data
        except grpc.RpcError as e:
            raise CliError(f"error: {e.details() or e.code()}") from None
    finally:
        ch.close()
