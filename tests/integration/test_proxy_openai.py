"""The proxy's OpenAI-compatible API over HTTP (raw and with the openai client) against in-test fake replicas."""
import json

import openai
import pytest

from support.fakes import CHUNKS, FakeReplica, publish
from support.fakes import head, http, proxy  # noqa: F401  (shared fixtures)
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

TEXT = "".join(CHUNKS)


@pytest.fixture
async def replica(proxy, head, http):
    """One fake replica of model "tiny", published to the proxy."""
    r = await FakeReplica("tiny-000001").start()
    await publish(http, proxy, head, tiny=[r])
    yield r
    await r.server.stop(None)


def events(body: bytes) -> list[str]:
    """The data of each SSE event, checking the framing: every event is one `data: ` line and a blank line."""
    text = body.decode()
    assert text.endswith("\n\n"), text
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        out.append(block[len("data: "):])
    return out


async def post(http, proxy, path, body, **headers):
    async with http.post(f"{proxy.url}{path}", json=body, headers=headers) as r:
        return r.status, r.headers, await r.read()


def openai_error(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


async def test_chat_stream_is_sse_as_openai_sends_it(proxy, http, replica):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    status, headers, raw = await post(http, proxy, "/v1/chat/completions", body, **{"X-Request-Id": "oa-1"})
    assert status == 200 and headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["X-Request-Id"] == "oa-1"
    data = events(raw)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["id"] == "chatcmpl-oa-1" and c["object"] == "chat.completion.chunk" and c["model"] == "tiny"
               for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert deltas == CHUNKS
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_chat_stream_without_include_usage_has_no_usage_chunk(proxy, http, replica):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "long"}], "stream": True}
    _, _, raw = await post(http, proxy, "/v1/chat/completions", body)
    chunks = [json.loads(d) for d in events(raw)[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c and c["choices"] for c in chunks)


async def test_chat_without_stream_is_one_object_with_usage(proxy, http, replica):
    body = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    status, headers, raw = await post(http, proxy, "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(raw)
    assert data["object"] == "chat.completion" and data["id"] == f"chatcmpl-{headers['X-Request-Id']}"
    assert data["choices"][0]["message"]["content"] == TEXT
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert [(m.role, m.content) for m in replica.requests[-1].chat.messages] == [("system", "be brief"),
                                                                                ("user", "hi")]


async def test_completions_stream_and_whole(proxy, http, replica):
    body = {"model": "tiny", "prompt": "Once", "stream": True}
    _, _, raw = await post(http, proxy, "/v1/completions", body)
    chunks = [json.loads(d) for d in events(raw)[:-1]]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks] == [*CHUNKS, ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    status, _, raw = await post(http, proxy, "/v1/completions", {"model": "tiny", "prompt": ["long"]})
    data = json.loads(raw)
    assert status == 200 and data["choices"][0]["text"] == TEXT and data["choices"][0]["finish_reason"] == "length"
    assert replica.requests[-1].prompt == "long"


async def test_fields_reach_the_replica_and_harmless_ones_are_accepted(proxy, http, replica):
    body = {"model": "tiny", "messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": "x"}],
            "max_completion_tokens": 9, "temperature": 0, "top_p": 0.5, "stop": "\n", "seed": 42, "n": 1,
            "user": "alice", "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False,
            "logit_bias": {}, "tool_choice": "none", "max_tokens": None, "metadata": {"a": "b"}}
    status, _, raw = await post(http, proxy, "/v1/chat/completions", body)
    assert status == 200, raw
    sent = replica.requests[-1]
    assert sent.chat.messages[0].role == "system"
    p = sent.params
    assert (p.max_tokens, p.temperature, p.top_p, list(p.stop), p.seed) == (9, 0.0, 0.5, ["\n"], 42)
    assert p.HasField("temperature")


@pytest.mark.parametrize("path,body,status,param,needle", [
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2},
     400, "n", "only n=1"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "foo": 1},
     400, "foo", "unrecognized request argument 'foo'"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model", "'model' is required"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "'messages' is required"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]},
     400, "messages[0].role", "must be one of"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 33},
     400, "max_tokens", "[1, 32]"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 3]}, 400, "prompt", "token-id prompts"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "'nope' is not deployed"),
])
async def test_bad_requests_get_openai_errors_naming_the_field(proxy, http, replica, path, body, status, param,
                                                               needle):
    got, _, raw = await post(http, proxy, path, body)
    err = openai_error(raw)
    assert got == status and err["param"] == param and needle in err["message"], err
    assert replica.requests == []


async def test_unknown_model_code_and_overload_and_no_replica_statuses(proxy, head, http, replica):
    _, _, raw = await post(http, proxy, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert openai_error(raw)["code"] == "model_not_found"
    full = await FakeReplica("tiny-f00001", mode="exhausted").start()
    try:
        await publish(http, proxy, head, tiny=[full], empty=[])
        status, headers, raw = await post(http, proxy, "/v1/completions", {"model": "tiny", "prompt": "x"})
        assert status == 429 and headers["Retry-After"] == "1" and openai_error(raw)["type"] == "overloaded_error"
        status, _, raw = await post(http, proxy, "/v1/completions", {"model": "empty", "prompt": "x"})
        assert status == 503 and "no ready replica" in openai_error(raw)["message"]
    finally:
        await full.server.stop(None)


async def test_failure_after_the_stream_started_with_no_other_replica_is_an_error_event_then_done(
        proxy, head, http):
    r = await FakeReplica("tiny-d00001").start()
    await publish(http, proxy, head, tiny=[r])
    body = {"model": "tiny", "messages": [{"role": "user", "content": "die"}], "stream": True}
    status, _, raw = await post(http, proxy, "/v1/chat/completions", body)
    data = events(raw)
    assert status == 200 and data[-1] == "[DONE]"
    err = json.loads(data[-2])["error"]
    assert set(err) == {"message", "type", "param", "code"} and "tiny-d00001 failed mid-stream" in err["message"]
    assert [json.loads(d)["choices"][0]["delta"].get("content") for d in data[1:-2]] == ["par", "tial"]


async def test_models_lists_deployed_models_in_openai_shape(proxy, http, replica):
    async with http.get(f"{proxy.url}/v1/models") as r:
        data = await r.json()
    assert data["object"] == "list"
    tiny = next(m for m in data["data"] if m["id"] == "tiny")
    assert tiny["object"] == "model" and tiny["owned_by"] == "gridserve" and tiny["ready_replicas"] == 1
    async with http.get(f"{proxy.url}/v1/models/tiny") as r:
        assert r.status == 200 and (await r.json())["context_length"] == 128
    async with http.get(f"{proxy.url}/v1/models/nope") as r:
        assert r.status == 404 and openai_error(await r.read())["code"] == "model_not_found"
    async with http.get(f"{proxy.url}/v1/chat/completions") as r:
        assert r.status == 405 and "allowed: POST" in openai_error(await r.read())["message"]


async def test_openai_client_streams_and_not_and_sees_errors(proxy, http, replica):
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)
    try:
        done = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content == TEXT and done.usage.total_tokens == 7
        stream = await client.completions.create(model="tiny", prompt="Once", stream=True,
                                                 stream_options={"include_usage": True})
        pieces = [c async for c in stream]
        assert "".join(c.choices[0].text for c in pieces if c.choices) == TEXT
        assert pieces[-1].usage.completion_tokens == 4
        with pytest.raises(openai.NotFoundError, match="not deployed"):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError, match="only n=1"):
            await client.completions.create(model="tiny", prompt="x", n=3)
    finally:
        await client.close()


async def test_request_id_is_in_the_proxy_log_lines_of_openai_requests(proxy, http, replica):
    body = {"model": "tiny", "prompt": "x"}
    await post(http, proxy, "/v1/completions", body, **{"X-Request-Id": "oa-log-7"})
    def logged():
        lines = [ln for ln in proxy.log_path.read_text().splitlines() if "request_id=oa-log-7" in ln]
        return lines if any(" request_done " in ln for ln in lines) else None
    lines = await wait_until(logged, 5, "the request_done line")
    assert any(" request_start " in ln and "api=completions" in ln for ln in lines), lines
    assert any(" request_done " in ln and "status=200" in ln and "replica=tiny-000001" in ln for ln in lines)
    assert replica.requests[-1].request_id == "oa-log-7"
