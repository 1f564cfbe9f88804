"""The one server interceptor on a real grpc.aio server: named errors keep their code, any other exception
becomes INTERNAL with a short message and is logged with the call's request id; reflection lists the
services, behind the cluster token."""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gridserve.common import grpcutil
from gridserve.common.errors import Overloaded
from gridserve.common.security import Security
from gridserve.replica.server import SERVICE_NAME
from gridserve.v1 import replica_pb2, replica_pb2_grpc
from support.reflect import list_services

TOKEN = "a-cluster-token-of-enough-length"


class Broken(replica_pb2_grpc.ReplicaServicer):
    """Info fails with a bug (or a named error when asked for replica 'busy'); Generate fails mid-stream, or
    (request id 'big') streams large messages until cancelled and notes which task ran its cleanup."""

    def __init__(self):
        self.cleanup_task = asyncio.get_running_loop().create_future()

    async def Info(self, request, context):
        if dict(context.invocation_metadata()).get("x-fail") == "overloaded":
            raise Overloaded("too many requests queued")
        raise KeyError("slot")

    async def Generate(self, request, context):
        if request.request_id == "big":
            try:
                while True:
                    yield replica_pb2.GenerateResponse(text="x" * 100_000)
            finally:
                self.cleanup_task.set_result(asyncio.current_task().get_name())
        yield replica_pb2.GenerateResponse(text="first")
        raise ZeroDivisionError("step")


@pytest.fixture
async def servicer():
    return Broken()


@pytest.fixture
async def server(servicer):
    srv = grpcutil.make_server(Security(token=TOKEN))
    replica_pb2_grpc.add_ReplicaServicer_to_server(servicer, srv)
    grpcutil.add_health(srv)
    grpcutil.add_reflection(srv, SERVICE_NAME)
    port = grpcutil.bind(srv, "127.0.0.1", 0)
    await srv.start()
    yield f"127.0.0.1:{port}"
    await srv.stop(None)


@pytest.fixture
async def stub(server):
    async with grpcutil.channel(server, Security(token=TOKEN)) as ch:
        yield replica_pb2_grpc.ReplicaStub(ch)


async def test_an_unexpected_exception_is_internal_with_a_short_message_and_logged_with_the_request_id(
        stub, caplog):
    with caplog.at_level(logging.ERROR, logger="gridserve.grpc"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Info(replica_pb2.InfoRequest(), metadata=(("x-request-id", "rid-info-7"),), timeout=5)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert e.value.details() == ("internal error in /gridserve.v1.Replica/Info (request id rid-info-7): KeyError; "
                                 "the server's log has the details")
    [record] = [r for r in caplog.records if r.name == "gridserve.grpc"]
    assert "rpc_failed method=/gridserve.v1.Replica/Info error=KeyError request_id=rid-info-7" in record.getMessage()
    assert record.exc_info and record.exc_info[0] is KeyError  # the traceback goes to the log, not the client


async def test_a_stream_that_fails_midway_ends_internal_with_the_request_id_from_the_message(stub, caplog):
    call = stub.Generate(replica_pb2.GenerateRequest(request_id="rid-gen-9"), timeout=5)
    with caplog.at_level(logging.ERROR, logger="gridserve.grpc"):
        assert (await call.read()).text == "first"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "(request id rid-gen-9): ZeroDivisionError" in e.value.details()
    assert any("request_id=rid-gen-9" in r.getMessage() for r in caplog.records if r.name == "gridserve.grpc")


async def test_a_stream_cancelled_during_a_blocked_write_is_closed_inside_its_call(server, servicer):
    # The client stops reading, so a write blocks (a tiny flow-control window), then cancels. The handler's
    # finally must run in the call's own task, before grpc releases the call: run later by asyncio's
    # async-generator finalizer, a context.peer() there crashed the head (SIGSEGV, docs/scale.md).
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with grpcutil.channel(server, Security(token=TOKEN), options=small_window) as ch:
        call = replica_pb2_grpc.ReplicaStub(ch).Generate(replica_pb2.GenerateRequest(request_id="big"))
        assert len((await call.read()).text) == 100_000
        await asyncio.sleep(0.3)  # the server's next writes block on the window
        call.cancel()
        task = await asyncio.wait_for(servicer.cleanup_task, 5)
    assert task.startswith("HandleExceptions[")


async def test_a_reader_writer_stream_passes_the_interceptor(server):
    # grpc.health's Watch writes with context.write instead of yielding; it streams, not INTERNAL
    async with grpcutil.channel(server, Security(token=TOKEN)) as ch:
        call = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await asyncio.wait_for(call.read(), 5)).status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()


async def test_a_named_error_keeps_its_code_and_message(stub):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Info(replica_pb2.InfoRequest(), metadata=(("x-fail", "overloaded"),), timeout=5)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details() == "too many requests queued"


async def test_reflection_lists_every_service_to_a_caller_with_the_cluster_token(server):
    services, methods = await asyncio.to_thread(list_services, server, TOKEN, SERVICE_NAME)
    assert services == sorted([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME])
    assert methods == ["Generate", "Info", "SetThreads", "Embed"]


async def test_reflection_needs_the_cluster_token(server):
    with pytest.raises(grpc.RpcError) as e:
        await asyncio.to_thread(list_services, server, None)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
