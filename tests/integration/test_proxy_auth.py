"""API keys on the proxy: /v1/* needs a Bearer key (401 in each API's error shape); health, ready, metrics stay open."""
import json

import aiohttp
import openai
import pytest

from support.fakes import FakeHead, FakeReplica, Proxy, publish

pytestmark = pytest.mark.timeout(60)

FILE_KEY, FLAG_KEY = "sk-from-the-file-123", "sk-from-the-flag-456"


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory):
    """A fake head with one fake replica of "tiny", and a proxy with one key from a file and one from a flag."""
    work = tmp_path_factory.mktemp("auth")
    (work / "keys").write_text(f"# comment\n\n{FILE_KEY}\n")
    head = await FakeHead().start()
    replica = await FakeReplica("tiny-a00001").start()
    proxy = await Proxy(head.port, work, extra=("--api-key-file", str(work / "keys"),
                                                "--api-key", FLAG_KEY)).start()
    async with aiohttp.ClientSession() as http:
        await publish(http, proxy, head, tiny=[replica])
        yield proxy, http
    await proxy.stop()
    await replica.server.stop(None)
    await head.server.stop(None)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


async def test_openai_paths_need_a_valid_bearer_key(cluster):
    proxy, http = cluster
    for headers, message in (({}, "missing API key"), ({"Authorization": "Bearer nope-nope-nope"}, "invalid API key"),
                             ({"Authorization": f"Basic {FILE_KEY}"}, "missing API key")):
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT, headers=headers) as r:
            err = json.loads(await r.read())["error"]
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert set(err) == {"message", "type", "param", "code"} and message in err["message"]
            assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
    for key in (FILE_KEY, FLAG_KEY):
        async with http.post(f"{proxy.url}/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200, await r.text()
    async with http.get(f"{proxy.url}/v1/models") as r:
        assert r.status == 401


async def test_native_chat_needs_the_key_too_and_answers_in_its_own_shape(cluster):
    proxy, http = cluster
    async with http.post(f"{proxy.url}/v1/chat/tiny", data="hi") as r:
        assert r.status == 401
        assert json.loads(await r.read())["error"] == {"message": "missing API key: send the header "
                                                                  "'Authorization: Bearer <key>'",
                                                       "type": "authentication_error", "param": None,
                                                       "code": 401}
    async with http.post(f"{proxy.url}/v1/chat/tiny", data="hi", headers={"Authorization": f"Bearer {FILE_KEY}"}) as r:
        assert r.status == 200 and await r.text() == "Hello, world!"


async def test_health_ready_and_metrics_stay_open(cluster):
    proxy, http = cluster
    for path in ("/health", "/ready", "/metrics"):
        async with http.get(f"{proxy.url}{path}") as r:
            assert r.status == 200, path
    async with http.get(f"{proxy.url}/metrics") as r:
        assert "gridserve_auth_failures_total" in await r.text()


async def test_openai_client_with_a_wrong_key_gets_authentication_error(cluster):
    proxy, _ = cluster
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="sk-wrong-key", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            await client.chat.completions.create(**CHAT)
    finally:
        await client.close()
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=FLAG_KEY, max_retries=0)
    try:
        assert (await client.chat.completions.create(**CHAT)).choices[0].message.content == "Hello, world!"
    finally:
        await client.close()
