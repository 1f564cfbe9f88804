"""The real proxy process moving a stream to another replica when its replica dies or aborts mid-stream,
and skipping a replica that does not admit a request in time (fake replicas on 127.0.0.1)."""
import asyncio
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.waiting import wait_until
from support.fakes import CHUNKS, SCRIPT, SCRIPT_IDS, SCRIPT_TEXT, FakeReplica, Proxy, publish
from support.fakes import head, http, replicas  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.timeout(60)

ACCEPT_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
async def proxy(head, tmp_path_factory):
    p = await Proxy(head.port, tmp_path_factory.mktemp("proxy"),
                    extra=("--accept-timeout", str(ACCEPT_TIMEOUT_S))).start()
    yield p
    await p.stop()


async def post(http, proxy, path: str, body, request_id: str):
    kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
    async with http.post(f"{proxy.url}{path}", headers={"X-Request-Id": request_id}, **kwargs) as r:
        return r.status, r.headers, await r.read()


async def moved_over(http, proxy, head, first: FakeReplica, others: list, send):
    """Starts `send` (an HTTP request) while `first` is the only replica, so it gets the request; then
    publishes `others` beside it and lets `first` die (or abort) at its gate. Returns what `send` returns."""
    await publish(http, proxy, head, tiny=[first])
    task = asyncio.create_task(send)
    deadline = time.monotonic() + 10
    while not first.requests:
        assert time.monotonic() < deadline and not task.done(), "the request never reached the first replica"
        await asyncio.sleep(0.02)
    await publish(http, proxy, head, tiny=[first, *others])
    first.gate.set()
    return await task


def log_lines(proxy, request_id: str, name: str) -> list[str]:
    return [ln for ln in proxy.log_path.read_text().splitlines()
            if f"request_id={request_id}" in ln and f" {name} " in ln]


async def settled_log(proxy, request_id: str) -> str:
    """The request_done line of `request_id` once the proxy wrote it."""
    done = await wait_until(lambda: log_lines(proxy, request_id, "request_done"), 10,
                            f"the request_done line of {request_id}")
    return done[0]


def sse_data(body: bytes) -> list[str]:
    return [block[len("data: "):] for block in body.decode().split("\n\n") if block]


async def failover_counts(http, proxy) -> dict[str, float]:
    async with http.get(f"{proxy.url}/metrics") as r:
        text = await r.text()
    counts = {"resumed": 0.0, "failed": 0.0}
    counts.update({s.labels["outcome"]: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name == "gridserve_failovers_total" and s.labels["model"] == "tiny"})
    return counts


async def test_plain_stream_continues_on_another_replica_with_no_text_repeated_or_lost(proxy, head, http, replicas):
    first = await replicas("tiny-a00000", die_after=3, gate=asyncio.Event())
    second = await replicas("tiny-a00001")
    before = await failover_counts(http, proxy)
    status, headers, body = await moved_over(http, proxy, head, first, [second],
                                             post(http, proxy, "/v1/chat/tiny", "script", "fo-plain"))
    assert status == 200 and body.decode() == SCRIPT_TEXT  # the text a replica that never died gives
    assert headers["X-Replica-Id"] == "tiny-a00000"  # sent with the headers, before the failover
    resumed = second.requests[-1]
    assert list(resumed.resume_token_ids) == SCRIPT_IDS[:3]  # exactly the ids the first replica sent
    assert resumed.request_id == "fo-plain" and resumed.chat.messages[0].content == "script"
    done = await settled_log(proxy, "fo-plain")
    assert "failovers=1" in done and "final_replica=tiny-a00001" in done and "replica=tiny-a00000" in done
    assert f"tokens={len(SCRIPT_IDS)}" in done and "outcome=ok" in done
    [line] = log_lines(proxy, "fo-plain", "failover")
    assert "from_replica=tiny-a00000" in line and "to_replica=tiny-a00001" in line
    assert "tokens_sent=3" in line and 'reason="UNAVAILABLE: ' in line and "outcome=resumed" in line
    after = await failover_counts(http, proxy)
    assert after["resumed"] - before["resumed"] == 1 and after["failed"] == before["failed"]


async def test_sse_stream_continues_and_ends_with_a_normal_finish_usage_and_done(proxy, head, http, replicas):
    first = await replicas("tiny-b00000", die_after=4, gate=asyncio.Event())
    second = await replicas("tiny-b00001")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "script"}], "stream": True,
            "stream_options": {"include_usage": True}}
    status, _, raw = await moved_over(http, proxy, head, first, [second],
                                      post(http, proxy, "/v1/chat/completions", body, "fo-sse"))
    data = sse_data(raw)
    assert status == 200 and data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert not any("error" in c for c in chunks)
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert deltas == [text for _, text in SCRIPT if text]  # each piece once, in order
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": len(SCRIPT_IDS),
                                   "total_tokens": 3 + len(SCRIPT_IDS)}
    assert list(second.requests[-1].resume_token_ids) == SCRIPT_IDS[:4]


async def test_non_streaming_answer_is_whole_after_a_failover(proxy, head, http, replicas):
    first = await replicas("tiny-c00000", die_after=2, gate=asyncio.Event())
    second = await replicas("tiny-c00001")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "script"}]}
    status, _, raw = await moved_over(http, proxy, head, first, [second],
                                      post(http, proxy, "/v1/chat/completions", body, "fo-whole"))
    data = json.loads(raw)
    assert status == 200 and data["choices"][0]["message"]["content"] == SCRIPT_TEXT
    assert data["choices"][0]["finish_reason"] == "stop" and data["usage"]["completion_tokens"] == len(SCRIPT_IDS)
    assert list(second.requests[-1].resume_token_ids) == SCRIPT_IDS[:2]


async def test_a_draining_replicas_abort_chunk_is_failed_over(proxy, head, http, replicas):
    first = await replicas("tiny-d00000", abort_after=5, gate=asyncio.Event())
    second = await replicas("tiny-d00001")
    status, _, body = await moved_over(http, proxy, head, first, [second],
                                       post(http, proxy, "/v1/chat/tiny", "script", "fo-abort"))
    assert status == 200 and body.decode() == SCRIPT_TEXT
    assert list(second.requests[-1].resume_token_ids) == SCRIPT_IDS[:6]
    [line] = log_lines(proxy, "fo-abort", "failover")
    assert "reason=ABORT" in line and "to_replica=tiny-d00001" in line


async def test_with_no_other_replica_streams_end_with_an_explicit_error_and_whole_answers_are_503(
        proxy, head, http, replicas):
    before = await failover_counts(http, proxy)
    only = await replicas("tiny-e00000", die_after=3)
    await publish(http, proxy, head, tiny=[only])
    status, _, body = await post(http, proxy, "/v1/chat/tiny", "script", "fo-none-1")
    text = body.decode()
    assert status == 200 and text.startswith("The quick\n")
    err = json.loads(text.splitlines()[-1])["error"]
    assert err["code"] == 503 and "tiny-e00000 failed mid-stream" in err["message"]
    assert "no replica could continue: no other ready replica for model 'tiny'" in err["message"]

    only = await replicas("tiny-e00001", die_after=3)
    await publish(http, proxy, head, tiny=[only])
    sse = {"model": "tiny", "messages": [{"role": "user", "content": "script"}], "stream": True}
    status, _, raw = await post(http, proxy, "/v1/chat/completions", sse, "fo-none-2")
    data = sse_data(raw)
    assert status == 200 and data[-1] == "[DONE]"
    assert "no replica could continue" in json.loads(data[-2])["error"]["message"]

    only = await replicas("tiny-e00002", die_after=3)
    await publish(http, proxy, head, tiny=[only])
    whole = {"model": "tiny", "messages": [{"role": "user", "content": "script"}]}
    status, _, raw = await post(http, proxy, "/v1/chat/completions", whole, "fo-none-3")
    assert status == 503 and "no replica could continue" in json.loads(raw)["error"]["message"]
    after = await failover_counts(http, proxy)
    assert after["failed"] - before["failed"] == 3 and after["resumed"] == before["resumed"]


async def hold(proxy, request_id: str) -> asyncio.StreamWriter:
    """A stream that stays open on the replica serving "hold": that replica is the busier one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write((f"POST /v1/chat/tiny HTTP/1.1\r\nHost: x\r\nX-Request-Id: {request_id}\r\n"
                  "Content-Length: 4\r\n\r\nhold").encode())
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"first"), 10)
    return writer


async def test_a_mute_replica_is_given_up_after_the_accept_timeout_and_another_answers(proxy, head, http, replicas):
    good = await replicas("tiny-f00000")
    await publish(http, proxy, head, tiny=[good])
    holder = await hold(proxy, "fo-hold-1")  # p2c now prefers the idle mute replica
    try:
        mute = await replicas("tiny-f00001", mode="mute")
        await publish(http, proxy, head, tiny=[mute, good])
        started = time.monotonic()
        status, headers, body = await post(http, proxy, "/v1/chat/tiny", "hi", "fo-mute")
        took = time.monotonic() - started
    finally:
        holder.close()
    assert status == 200 and body.decode() == "".join(CHUNKS) and headers["X-Replica-Id"] == "tiny-f00000"
    assert [r.request_id for r in mute.requests] == ["fo-mute"]
    assert ACCEPT_TIMEOUT_S <= took < ACCEPT_TIMEOUT_S + 3, took
    await asyncio.wait_for(mute.cancelled["fo-mute"].wait(), 5)
    assert "did not accept the request within 1s" in proxy.log_path.read_text()


async def test_an_admitted_request_may_wait_longer_than_the_accept_timeout(proxy, head, http, replicas):
    queued = await replicas("tiny-g00000")
    await publish(http, proxy, head, tiny=[queued])
    status, _, body = await post(http, proxy, "/v1/chat/tiny", "queued", "fo-queued")  # 1.5 s in its queue
    assert status == 200 and body.decode() == "".join(CHUNKS) and len(queued.requests) == 1


async def test_a_failover_skips_a_mute_replica_after_the_accept_timeout(proxy, head, http, replicas):
    good = await replicas("tiny-h00000")
    await publish(http, proxy, head, tiny=[good])
    holder = await hold(proxy, "fo-hold-2")
    first = await replicas("tiny-h00001", die_after=3, gate=asyncio.Event())
    mute = await replicas("tiny-h00002", mode="mute")
    try:
        status, _, body = await moved_over(http, proxy, head, first, [mute, good],
                                           post(http, proxy, "/v1/chat/tiny", "script", "fo-mute-2"))
    finally:
        holder.close()
    assert status == 200 and body.decode() == SCRIPT_TEXT
    assert list(mute.requests[-1].resume_token_ids) == SCRIPT_IDS[:3]
    assert list(good.requests[-1].resume_token_ids) == SCRIPT_IDS[:3]
    assert "final_replica=tiny-h00000" in await settled_log(proxy, "fo-mute-2")
