"""Per-key rate limits on the real proxy: exact x-ratelimit-* headers on answers, 429 with Retry-After, metrics."""
import json

import aiohttp
import pytest

from support.fakes import FakeHead, FakeReplica, Proxy, publish

pytestmark = pytest.mark.timeout(60)

RPM_KEY, TPM_KEY, FREE_KEY = "sk-two-a-minute-1", "sk-ten-tokens-2", "sk-unlimited-3"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}  # the fake answers 3 + 4 tokens


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("limits")
    (work / "keys").write_text(f"{RPM_KEY} rpm=2\n{TPM_KEY} tpm=10\n{FREE_KEY}\n")
    head = await FakeHead().start()
    replica = await FakeReplica("tiny-a00001").start()
    proxy = await Proxy(head.port, work, extra=("--api-key-file", str(work / "keys"))).start()
    async with aiohttp.ClientSession() as http:
        await publish(http, proxy, head, tiny=[replica])
        yield proxy, http
    await proxy.stop()
    await replica.server.stop(None)
    await head.server.stop(None)


async def post(http, proxy, key, path="/v1/chat/completions", **kw):
    async with http.post(f"{proxy.url}{path}", headers={"Authorization": f"Bearer {key}"}, **kw) as r:
        return r.status, r.headers, await r.read()


def ratelimit(headers) -> dict:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


async def test_requests_per_minute_headers_then_429_with_retry_after(cluster):
    proxy, http = cluster
    status, headers, _ = await post(http, proxy, RPM_KEY, json=CHAT)
    assert status == 200 and ratelimit(headers) == {"x-ratelimit-limit-requests": "2",
                                                    "x-ratelimit-remaining-requests": "1",
                                                    "x-ratelimit-reset-requests": "30s"}
    status, headers, _ = await post(http, proxy, RPM_KEY, json={**CHAT, "stream": True})  # streamed: same headers
    assert status == 200 and ratelimit(headers)["x-ratelimit-remaining-requests"] == "0"
    assert ratelimit(headers)["x-ratelimit-reset-requests"] == "1m0s"
    status, headers, body = await post(http, proxy, RPM_KEY, path="/v1/chat/tiny", data="hi")  # native too
    assert status == 429 and headers["Retry-After"] == "30"
    assert ratelimit(headers) == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0",
                                  "x-ratelimit-reset-requests": "1m0s"}
    assert "rate limit reached for requests per minute (limit 2)" in json.loads(body)["error"]["message"]
    status, headers, body = await post(http, proxy, RPM_KEY, json=CHAT)
    err = json.loads(body)["error"]
    assert status == 429 and err["type"] == "requests" and err["code"] == "rate_limit_exceeded"


async def test_tokens_per_minute_are_charged_from_usage(cluster):
    proxy, http = cluster
    status, headers, _ = await post(http, proxy, TPM_KEY, json=CHAT)
    assert status == 200 and ratelimit(headers) == {"x-ratelimit-limit-tokens": "10",
                                                    "x-ratelimit-remaining-tokens": "10",
                                                    "x-ratelimit-reset-tokens": "0s"}
    status, headers, _ = await post(http, proxy, TPM_KEY, json=CHAT)  # 3 left after 7; reset: 7 at 10/min
    assert status == 200 and ratelimit(headers) == {"x-ratelimit-limit-tokens": "10",
                                                    "x-ratelimit-remaining-tokens": "3",
                                                    "x-ratelimit-reset-tokens": "42s"}
    status, headers, body = await post(http, proxy, TPM_KEY, json=CHAT)  # -4: 24 s until above zero
    assert status == 429 and headers["Retry-After"] == "24"
    assert ratelimit(headers) == {"x-ratelimit-limit-tokens": "10", "x-ratelimit-remaining-tokens": "0",
                                  "x-ratelimit-reset-tokens": "1m24s"}
    assert json.loads(body)["error"]["type"] == "tokens"


async def test_a_key_without_limits_has_no_headers_and_refusals_are_counted(cluster):
    proxy, http = cluster
    for _ in range(3):
        status, headers, _ = await post(http, proxy, FREE_KEY, json=CHAT)
        assert status == 200 and ratelimit(headers) == {}
    async with http.get(f"{proxy.url}/metrics") as r:
        text = await r.text()
    assert 'gridserve_rate_limited_total{limit="requests"} 2.0' in text
    assert 'gridserve_rate_limited_total{limit="tokens"} 1.0' in text
