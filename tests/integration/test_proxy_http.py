"""The real proxy process over HTTP against in-test fake heads and replicas (real grpc.aio servers on 127.0.0.1)."""
import asyncio
import json
import time

import pytest

from support.fakes import CHUNKS, FakeHead, FakeReplica, Proxy, publish
from support.waiting import free_port
from support.fakes import head, http, proxy  # noqa: F401  (shared fixtures)
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def replicas():
    """Starts fake replicas on demand; stops them all after the test."""
    started: list[FakeReplica] = []

    async def make(replica_id: str, mode: str = "ok") -> FakeReplica:
        r = await FakeReplica(replica_id, mode).start()
        started.append(r)
        return r

    yield make
    await asyncio.gather(*(r.server.stop(None) for r in started))


async def chat(http, proxy, model, text, **headers):
    async with http.post(f"{proxy.url}/v1/chat/{model}", data=text, headers=headers) as r:
        return r.status, r.headers, await r.read()


async def test_tokens_stream_in_separate_chunks_as_the_replica_produces_them(proxy, head, http, replicas):
    r1 = await replicas("tiny-aaaaaa")
    await publish(http, proxy, head, tiny=[r1])
    arrivals = []
    async with http.post(f"{proxy.url}/v1/chat/tiny", data="slow", headers={"X-Request-Id": "stream-test-1"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert r.headers["X-Request-Id"] == "stream-test-1" and r.headers["X-Replica-Id"] == "tiny-aaaaaa"
        while data := await r.content.readany():
            arrivals.append((time.monotonic(), data.decode()))
    assert "".join(d for _, d in arrivals) == "".join(CHUNKS)
    assert len(arrivals) >= 3
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert sum(g > 0.15 for g in gaps) >= 2, gaps  # pieces came as produced (0.3 s apart), not at the end
    sent = r1.requests[-1]
    assert sent.request_id == "stream-test-1" and sent.chat.messages[0].role == "user"
    def logged():
        lines = [ln for ln in proxy.log_path.read_text().splitlines() if "request_id=stream-test-1" in ln]
        return lines if any(" request_done " in ln for ln in lines) else None
    lines = await wait_until(logged, 5, "the request_done line")
    assert any(" request_start " in ln for ln in lines)
    done = [ln for ln in lines if " request_done " in ln]
    assert done and "replica=tiny-aaaaaa" in done[0] and "status=200" in done[0] and "tokens=4" in done[0]


async def test_json_body_reaches_the_replica_as_prompt_and_sampling_params(proxy, head, http, replicas):
    r1 = await replicas("tiny-bbbbbb")
    await publish(http, proxy, head, tiny=[r1])
    body = {"prompt": "Once", "max_tokens": 8, "temperature": 0, "stop": ["\n"], "seed": 7}
    async with http.post(f"{proxy.url}/v1/chat/tiny", json=body, headers={"X-Request-Id": "bad id!"}) as r:
        assert r.status == 200 and await r.text() == "".join(CHUNKS)
        generated_id = r.headers["X-Request-Id"]
    sent = r1.requests[-1]
    assert generated_id != "bad id!" and sent.request_id == generated_id
    assert sent.prompt == "Once" and sent.params.max_tokens == 8 and sent.params.HasField("temperature")
    assert list(sent.params.stop) == ["\n"] and sent.params.seed == 7


def error_of(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


async def test_bad_requests_get_json_errors_with_fitting_statuses(proxy, head, http, replicas):
    r1 = await replicas("tiny-cccccc")
    await publish(http, proxy, head, tiny=[r1], other=[r1])
    status, headers, body = await chat(http, proxy, "nope", "hi", **{"X-Request-Id": "rid-404"})
    assert status == 404 and headers["X-Request-Id"] == "rid-404"
    err = error_of(body)
    assert err["type"] == "not_found_error" and err["code"] == 404 and "other, tiny" in err["message"]
    cases = [
        ("", {}, "empty", None),
        ("{broken", {"Content-Type": "application/json"}, "not valid JSON", None),
        (json.dumps({"prompt": "x", "max_tokens": 33}), {"Content-Type": "application/json"}, r"[1, 32]", "max_tokens"),
        (json.dumps({"prompt": "x", "top_p": 0}), {"Content-Type": "application/json"}, "(0, 1]", "top_p"),
        (json.dumps({"prompt": "x", "top_p": 1e-300}), {"Content-Type": "application/json"}, "(0, 1]", "top_p"),
        (json.dumps({"prompt": "x", "stop": list("abcde")}), {"Content-Type": "application/json"}, "up to 4", "stop"),
        (json.dumps({"messages": "hi"}), {"Content-Type": "application/json"}, "non-empty list", "messages"),
    ]
    for data, headers, needle, param in cases:
        async with http.post(f"{proxy.url}/v1/chat/tiny", data=data, headers=headers) as r:
            err = error_of(await r.read())
            assert r.status == 400 and err["type"] == "invalid_request_error", (data, err)
            assert needle in err["message"] and err["param"] == param, (needle, err)
    assert r1.requests == []  # nothing invalid reached a replica
    async with http.post(f"{proxy.url}/v1/chat/tiny", data="x" * 5000) as r:
        assert r.status == 413 and error_of(await r.read())["type"] == "request_too_large"
    async with http.get(f"{proxy.url}/no/such/path") as r:
        err = error_of(await r.read())
        assert r.status == 404 and err["type"] == "not_found_error" and "X-Request-Id" in r.headers
        assert err["code"] == "not_found" and err["param"] is None  # outside the native path: a string code
    async with http.get(f"{proxy.url}/v1/chat/tiny") as r:
        assert r.status == 405 and "allowed: POST" in error_of(await r.read())["message"]
        assert r.headers["Allow"] == "POST" and "X-Request-Id" in r.headers


async def raw_exchange(proxy, data: bytes) -> tuple[bytes, bytes]:
    """Raw bytes to the proxy on a fresh connection; the status line and headers, and the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("data, status, code", [
    (b"G@T /health HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_method"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"POST /v1/chat/tiny HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\nhi\r\n0\r\n\r\n", 400, "bad_http_request"),
])
async def test_what_the_http_parser_refuses_is_answered_in_json_by_the_proxy_process(proxy, data, status, code):
    head, body = await raw_exchange(proxy, data)
    assert head.split(b" ")[1] == str(status).encode(), head
    assert b"\r\nContent-Type: application/json" in head and b"\r\nX-Request-Id: " in head
    err = json.loads(body)["error"]
    assert err["code"] == code and err["param"] is None and "aaaa" not in err["message"], err


async def test_replica_invalid_argument_becomes_400_with_the_replicas_message(proxy, head, http, replicas):
    r1 = await replicas("tiny-dddddd", mode="invalid")
    await publish(http, proxy, head, tiny=[r1])
    status, _, body = await chat(http, proxy, "tiny", "a very long prompt")
    err = error_of(body)
    assert status == 400 and err["message"] == "prompt is 300 tokens but the context length is 128"
    assert len(r1.requests) == 1  # a bad request is not retried


async def test_no_ready_replica_is_503_with_retry_after_and_ready_says_which(proxy, head, http, replicas):
    r1 = await replicas("tiny-eeeeee")
    await publish(http, proxy, head, tiny=[r1], empty=[])
    status, headers, body = await chat(http, proxy, "empty", "hi")
    assert status == 503 and headers["Retry-After"] == "1"
    assert error_of(body)["type"] == "service_unavailable" and "no ready replica" in error_of(body)["message"]
    async with http.get(f"{proxy.url}/ready") as r:
        assert r.status == 503 and error_of(await r.read())["message"].endswith("no ready replica for empty")
    async with http.get(f"{proxy.url}/v1/models") as r:
        models = {m["id"]: m for m in (await r.json())["data"]}
    assert models["empty"]["ready_replicas"] == 0 and models["tiny"]["ready_replicas"] == 1
    assert models["tiny"]["object"] == "model" and models["tiny"]["context_length"] == 128
    await publish(http, proxy, head, tiny=[r1])
    async with http.get(f"{proxy.url}/ready") as r:
        assert r.status == 200 and (await r.json())["models"] == {"tiny": 1}
    async with http.get(f"{proxy.url}/health") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_all_replicas_overloaded_is_429_with_retry_after(proxy, head, http, replicas):
    full = [await replicas(f"tiny-f0000{i}", mode="exhausted") for i in range(2)]
    await publish(http, proxy, head, tiny=full)
    status, headers, body = await chat(http, proxy, "tiny", "hi")
    assert status == 429 and headers["Retry-After"] == "1"
    assert error_of(body)["type"] == "overloaded_error" and "queue is full" in error_of(body)["message"]
    assert [len(r.requests) for r in full] == [1, 1]  # each replica tried once


async def hold_stream(proxy: Proxy, request_id: str):
    """A raw HTTP request for a stream that stays open; returns (reader, writer) after the first chunk."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write((f"POST /v1/chat/tiny HTTP/1.1\r\nHost: x\r\nX-Request-Id: {request_id}\r\n"
                  "Content-Type: text/plain\r\nContent-Length: 4\r\n\r\nhold").encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"first" in await asyncio.wait_for(reader.read(100), 10)
    return reader, writer


async def wait_event(event: asyncio.Event, timeout: float = 5.0) -> None:
    await asyncio.wait_for(event.wait(), timeout)


async def test_failure_before_the_first_token_is_retried_on_another_replica(proxy, head, http, replicas):
    good = await replicas("tiny-g00000")
    await publish(http, proxy, head, tiny=[good])
    _, holder = await hold_stream(proxy, "holder-1")  # good now has one stream in flight
    try:
        down = await replicas("tiny-g00001", mode="unavailable")
        await publish(http, proxy, head, tiny=[down, f"127.0.0.1:{free_port()}", good])
        # p2c prefers the two idle endpoints (one answers UNAVAILABLE, one refuses connections)
        # before the busy good one, so this request must fail twice and then succeed.
        status, headers, body = await chat(http, proxy, "tiny", "hi", **{"X-Request-Id": "retry-1"})
        assert status == 200 and body.decode() == "".join(CHUNKS)
        assert headers["X-Replica-Id"] == "tiny-g00000"
        assert [r.request_id for r in down.requests] == ["retry-1"]
    finally:
        holder.close()
    await wait_event(good.cancelled["holder-1"])


async def test_a_new_endpoint_from_a_route_update_gets_traffic(proxy, head, http, replicas):
    old = await replicas("tiny-h00000")
    await publish(http, proxy, head, tiny=[old])
    _, holder = await hold_stream(proxy, "holder-2")
    try:
        new = await replicas("tiny-h00001")
        await publish(http, proxy, head, tiny=[old, new])
        status, headers, _ = await chat(http, proxy, "tiny", "hi")
        assert status == 200 and headers["X-Replica-Id"] == "tiny-h00001" and len(new.requests) == 1
    finally:
        holder.close()


async def test_client_disconnect_mid_stream_cancels_the_replica_call(proxy, head, http, replicas):
    r1 = await replicas("tiny-i00000")
    await publish(http, proxy, head, tiny=[r1])
    _, writer = await hold_stream(proxy, "gone-1")
    writer.close()
    await wait_event(r1.cancelled["gone-1"])


async def test_client_disconnect_before_the_first_token_cancels_the_replica_call(proxy, head, http, replicas):
    r1 = await replicas("tiny-j00000")
    await publish(http, proxy, head, tiny=[r1])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/chat/tiny HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-2\r\n"
                 b"Content-Length: 9\r\n\r\nslowstart")
    await writer.drain()
    deadline = time.monotonic() + 5
    while "gone-2" not in r1.cancelled:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    writer.close()
    await wait_event(r1.cancelled["gone-2"])


async def test_replica_dying_mid_stream_with_no_other_replica_ends_the_body_with_a_json_error_line(
        proxy, head, http, replicas):
    r1 = await replicas("tiny-k00000")
    await publish(http, proxy, head, tiny=[r1])
    status, _, body = await chat(http, proxy, "tiny", "die")
    assert status == 200
    text = body.decode()
    assert text.startswith("partial\n") and text.endswith("\n")
    err = error_of(text.splitlines()[-1].encode())
    assert err["code"] >= 500 and "tiny-k00000 failed mid-stream" in err["message"]
    assert "no replica could continue" in err["message"]


async def test_head_going_away_keeps_serving_from_the_last_snapshot(http, replicas, tmp_path):
    head = await FakeHead().start()
    proxy = await Proxy(head.port, tmp_path).start()
    try:
        r1 = await replicas("tiny-l00000")
        await publish(http, proxy, head, tiny=[r1])
        await head.server.stop(None)

        async def head_lost():
            async with http.get(f"{proxy.url}/health") as r:
                return (await r.json())["head_connected"] is False
        await wait_until(head_lost, 10, "the proxy to see the head gone")
        status, _, body = await chat(http, proxy, "tiny", "hi")
        assert status == 200 and body.decode() == "".join(CHUNKS)

        r2 = await replicas("tiny-l00001")  # the head comes back on its address with a new table
        head = await FakeHead().start(head.port)
        await publish(http, proxy, head, tiny=[r2])
        status, headers, _ = await chat(http, proxy, "tiny", "hi")
        assert status == 200 and headers["X-Replica-Id"] == "tiny-l00001"
    finally:
        rc = await proxy.stop()
        await head.server.stop(None)
    assert rc == 0, proxy.log_path.read_text()
    assert "proxy_stopped" in proxy.log_path.read_text()


async def test_a_request_to_a_proxy_that_has_no_routes_yet_waits_for_the_first_table(http, replicas, tmp_path):
    r1 = await replicas("tiny-m00000")
    # a head slow to send its table (the proxy just restarted); slow enough that the checks below run
    # before it comes, on a loaded machine too, and within the 5 s a request waits for the first table
    head = await FakeHead(first_delay_s=3.0).start()
    head.publish(tiny=[r1])
    proxy = await Proxy(head.port, tmp_path).start()
    try:
        async with http.get(f"{proxy.url}/health") as r:  # liveness: up at once
            assert r.status == 200 and (await r.json())["routes_version"] == 0
        async with http.get(f"{proxy.url}/ready") as r:  # readiness: not without routes
            assert r.status == 503
        started = time.monotonic()
        status, headers, body = await chat(http, proxy, "tiny", "hi")
        assert status == 200 and body.decode() == "".join(CHUNKS) and headers["X-Replica-Id"] == "tiny-m00000"
        assert time.monotonic() - started > 0.3  # it waited for the table instead of a 503 at once
    finally:
        await proxy.stop()
        await head.server.stop(None)
