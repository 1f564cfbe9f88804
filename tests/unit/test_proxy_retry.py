"""Mid-stream failover in the proxy (Upstreams, open_stream) against fake replicas on 127.0.0.1: what is
failed over, what the resuming replica is asked, the limit, the accept timeout, cancellation."""
import asyncio
import itertools

import grpc
import pytest

from gridserve.common.errors import Cancelled, InvalidRequest, Unavailable
from gridserve.proxy.stream_resume import Upstreams
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.route_cache import RouteCache
from gridserve.proxy.retry import RetryPolicy, open_stream, replica_lost
from gridserve.v1 import head_pb2, replica_pb2
from support.fakes import SCRIPT, SCRIPT_IDS, SCRIPT_TEXT, FakeReplica, model_config
from support.fakes import replicas  # noqa: F401  (shared fixture)

pytestmark = pytest.mark.timeout(30)

POLICY = RetryPolicy(backoff_initial_s=0.01, backoff_max_s=0.05, accept_timeout_s=5.0)
_versions = itertools.count(1)


@pytest.fixture
async def table():
    t = RouteCache()
    yield t
    await t.close()


def route(table: RouteCache, *replicas: FakeReplica) -> None:
    """Installs a newer snapshot with model "tiny" served by `replicas`."""
    snapshot = head_pb2.RoutingTable(version=next(_versions))
    r = snapshot.routes.add(model="tiny", model_config=model_config("tiny"))
    for replica in replicas:
        r.endpoints.add(replica_id=replica.replica_id, address=replica.address, node_id="n1")
    assert table.apply(snapshot)


def script_request(request_id: str) -> replica_pb2.GenerateRequest:
    return replica_pb2.GenerateRequest(request_id=request_id, prompt="script",
                                       params=replica_pb2.SamplingParams(max_tokens=20, temperature=0))


async def read_all(upstreams: Upstreams) -> list[replica_pb2.GenerateResponse]:
    await upstreams.open()
    return [chunk async for chunk in upstreams.chunks()]


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize("code,details,lost", [
    (grpc.StatusCode.UNAVAILABLE, "Socket closed", True),
    (grpc.StatusCode.UNAVAILABLE, "Cancelling all calls", True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
    (grpc.StatusCode.CANCELLED, "Cancelled on the server side", True),
    (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
    (grpc.StatusCode.UNKNOWN, "Stream removed", True),
    (grpc.StatusCode.INTERNAL, "recvmsg:Connection reset by peer", True),
    (grpc.StatusCode.UNKNOWN, "Exception iterating responses: division by zero", False),
    (grpc.StatusCode.INTERNAL, "tensor shape mismatch", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "Socket closed", False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "engine queue is full", False),
    (grpc.StatusCode.FAILED_PRECONDITION, "connection reset", False),
])
def test_only_failures_that_mean_the_replica_went_away_are_failed_over(code, details, lost):
    assert replica_lost(rpc_error(code, details)) is lost


async def test_a_replica_whose_server_cancels_the_call_before_the_first_chunk_is_retried_on_another(replicas, table):
    """A replica stopping as a request arrives cancels the call (CANCELLED) before it streamed anything:
    the request never ran there, so it goes to another replica, as a loss mid-stream would."""
    gone = await replicas("tiny-c00001", die_after=0, die_with=Cancelled("the server is stopping"))
    ok = await replicas("tiny-c00002")
    route(table, gone, ok)
    busy = table.acquire(next(e for e in table.routes["tiny"].endpoints if e.replica_id == ok.replica_id))
    try:  # one stream in flight on `ok`: the power of two choices tries `gone` first
        stream = await open_stream(table, "tiny", script_request("r-cancel"), POLICY)
    finally:
        busy.release()
    chunks = [chunk async for chunk in stream.chunks()]
    stream.close()
    assert len(gone.requests) == 1 and len(ok.requests) == 1
    assert "".join(c.text for c in chunks) == SCRIPT_TEXT


async def test_a_stream_survives_two_failovers_and_each_replica_is_asked_once_with_the_ids_so_far(replicas, table):
    # Each replica fails UNAVAILABLE after 4 chunks but stays up: only skipping the replicas already
    # tried keeps the proxy from asking one of them again.
    reps = [await replicas(f"tiny-a0000{i}", die_after=4, die_with=Unavailable("draining")) for i in range(3)]
    route(table, *reps)
    outcomes: list[str] = []
    upstreams = Upstreams(table, "tiny", script_request("fo-1"), POLICY, on_failover=outcomes.append)
    try:
        chunks = await read_all(upstreams)
    finally:
        upstreams.close()
    assert "".join(c.text for c in chunks) == SCRIPT_TEXT
    assert [i for c in chunks for i in c.token_ids] == SCRIPT_IDS
    assert chunks[-1].finish_reason == replica_pb2.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens == len(SCRIPT_IDS)
    assert [len(r.requests) for r in reps] == [1, 1, 1]
    sent = sorted((r.requests[0] for r in reps), key=lambda q: len(q.resume_token_ids))
    assert [list(q.resume_token_ids) for q in sent] == [[], SCRIPT_IDS[:4], SCRIPT_IDS[:9]]
    for q in sent:  # the rest of the request is unchanged (max_tokens too: the resumed ids count toward it)
        q.ClearField("resume_token_ids")
        assert q == script_request("fo-1")
    assert upstreams.failovers == 2 and outcomes == ["resumed", "resumed"]
    assert all(table.inflight(r.address) == 0 for r in reps)


async def test_the_failover_limit_ends_the_stream_with_an_error_naming_it(replicas, table):
    reps = [await replicas(f"tiny-b0000{i}", die_after=3, die_with=Unavailable("draining")) for i in range(3)]
    route(table, *reps)
    outcomes: list[str] = []
    upstreams = Upstreams(table, "tiny", script_request("fo-2"), RetryPolicy(max_failovers=1),
                          on_failover=outcomes.append)
    got: list[replica_pb2.GenerateResponse] = []
    try:
        await upstreams.open()
        with pytest.raises(HttpError) as exc:
            async for chunk in upstreams.chunks():
                got.append(chunk)
    finally:
        upstreams.close()
    assert exc.value.status == 503 and "failed mid-stream" in exc.value.message
    assert "failover limit of 1 reached" in exc.value.message
    assert "".join(c.text for c in got) == "".join(text for _, text in SCRIPT[:6])
    assert sorted(len(r.requests) for r in reps) == [0, 1, 1] and outcomes == ["resumed", "failed"]


async def test_a_mid_stream_failure_that_is_the_requests_fault_is_not_failed_over(replicas, table):
    reps = [await replicas(f"tiny-c0000{i}", die_after=2, die_with=InvalidRequest("stop string too long"))
            for i in range(2)]
    route(table, *reps)
    upstreams = Upstreams(table, "tiny", script_request("fo-3"), POLICY)
    try:
        with pytest.raises(HttpError) as exc:
            await read_all(upstreams)
    finally:
        upstreams.close()
    assert exc.value.status == 400 and exc.value.message == "stop string too long"
    assert sum(len(r.requests) for r in reps) == 1 and upstreams.failovers == 0


async def test_an_abort_chunk_is_failed_over_and_its_finish_and_usage_never_reach_the_client(replicas, table):
    draining = await replicas("tiny-d00000", abort_after=4)
    other = await replicas("tiny-d00001")
    route(table, draining)
    upstreams = Upstreams(table, "tiny", script_request("fo-4"), POLICY)
    try:
        await upstreams.open()
        route(table, draining, other)
        chunks = [chunk async for chunk in upstreams.chunks()]
    finally:
        upstreams.close()
    assert "".join(c.text for c in chunks) == SCRIPT_TEXT
    assert all(c.finish_reason != replica_pb2.FINISH_REASON_ABORT for c in chunks)
    assert [c.usage.completion_tokens for c in chunks if c.HasField("usage")] == [len(SCRIPT_IDS)]
    assert list(other.requests[0].resume_token_ids) == SCRIPT_IDS[:4] and upstreams.replica_id == "tiny-d00001"


async def test_a_replica_that_does_not_accept_in_time_is_cancelled_and_the_try_is_retryable(replicas, table):
    mute = await replicas("tiny-e00000", mode="mute")
    route(table, mute)
    with pytest.raises(HttpError) as exc:
        await open_stream(table, "tiny", script_request("fo-5"), RetryPolicy(accept_timeout_s=0.3))
    assert exc.value.status == 503
    assert exc.value.message == "replica tiny-e00000 did not accept the request within 0.3s"
    await asyncio.wait_for(mute.cancelled["fo-5"].wait(), 5)
    assert table.inflight(mute.address) == 0


async def test_a_client_leaving_during_a_failover_cancels_the_new_call_and_releases_every_replica(replicas, table):
    dying = await replicas("tiny-f00000", die_after=1)
    mute = await replicas("tiny-f00001", mode="mute")
    route(table, dying)
    upstreams = Upstreams(table, "tiny", script_request("fo-6"), POLICY)
    await upstreams.open()
    route(table, dying, mute)
    reader = asyncio.create_task(read_all_chunks(upstreams))
    while not mute.requests:  # the failover is waiting for the mute replica to accept
        await asyncio.sleep(0.02)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    upstreams.close()
    await asyncio.wait_for(mute.cancelled["fo-6"].wait(), 5)
    assert list(mute.requests[0].resume_token_ids) == SCRIPT_IDS[:1]
    assert table.inflight(dying.address) == 0 and table.inflight(mute.address) == 0


async def read_all_chunks(upstreams: Upstreams) -> list[replica_pb2.GenerateResponse]:
    return [chunk async for chunk in upstreams.chunks()]
