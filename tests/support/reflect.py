"""A gRPC server reflection client for tests (what `grpcurl list` and `grpcurl describe` do), with the
cluster token on its stream as `grpcurl -H 'x-gridserve-token: ...'` sends it."""
from __future__ import annotations

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from gridserve.common.security import METADATA_KEY


class _Token(grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self.token = token

    def intercept_stream_stream(self, continuation, details, request_iterator):
        md = [*(details.metadata or ()), (METADATA_KEY, self.token)]
        return continuation(details._replace(metadata=md), request_iterator)


def list_services(address: str, token: str | None = None, describe: str = "",
                  credentials: grpc.ChannelCredentials | None = None) -> tuple[list[str], list[str]]:
    """The services a server lists through reflection, and the method names of service `describe`.
    Blocking: from async code, run it with asyncio.to_thread."""
    with (grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)) as ch:
        ch = grpc.intercept_channel(ch, _Token(token)) if token else ch
        db = ProtoReflectionDescriptorDatabase(ch)
        methods = [m.name for m in DescriptorPool(db).FindServiceByName(describe).methods] if describe else []
        return sorted(db.get_services()), methods
