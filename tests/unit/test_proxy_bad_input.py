"""Whatever a client sends, the proxy answers: a success or a JSON error with X-Request-Id, never a 5xx, and it
keeps serving. The proxy app runs in-process (the runner `serve` uses) over a fake replica; requests go over raw
sockets so that malformed HTTP reaches it as sent."""
import asyncio
import gzip
import json
import logging
import re
import zlib
from types import SimpleNamespace

import pytest
from aiohttp import web
from hypothesis import event, given, strategies as st

from gridserve.proxy.auth import ApiKeys
from gridserve.proxy.http_errors import MAX_MESSAGE
from gridserve.proxy.http_rejections import JsonErrorsRunner
from gridserve.proxy.relay import ProxyState
from gridserve.proxy.route_cache import RouteCache
from gridserve.proxy.server import make_app
from gridserve.v1 import head_pb2
from support.fakes import CHUNKS, FakeReplica, model_config

pytestmark = pytest.mark.timeout(180)

MAX_BODY = 64 * 1024


class PlainReplica(FakeReplica):
    """A fake replica that answers every text with CHUNKS at once (no magic words that slow it or stop it)."""

    async def _reply(self, text: str):
        async for chunk in super()._reply("ok"):
            yield chunk


@pytest.fixture(scope="module")
async def proxy():
    replica = await PlainReplica("tiny-aaaaaa").start()
    table = RouteCache()
    snapshot = head_pb2.RoutingTable(version=1)
    route = snapshot.routes.add(model="tiny", model_config=model_config("tiny"))
    route.endpoints.add(replica_id=replica.replica_id, address=replica.address, node_id="n1")
    table.apply(snapshot)
    state = ProxyState(table, max_body_bytes=MAX_BODY, routes_wait_s=0.1)
    runner = JsonErrorsRunner(make_app(state), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield SimpleNamespace(port=runner.addresses[0][1], table=table, replica=replica)
    await runner.cleanup()
    await table.close()
    await replica.server.stop(None)


@pytest.fixture(scope="module")
def proxy_port(proxy) -> int:
    return proxy.port


async def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Sends raw bytes on a fresh connection; the status, headers (lower-case names) and body (de-chunked)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    while re.match(rb"HTTP/1\.\d 1\d\d ", head):  # an interim answer (100 Continue) before the real one
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def request(method: str, path: str, body: bytes = b"", headers=(), framing: str = "length",
            version: str = "HTTP/1.1") -> bytes:
    head = [f"{method} {path} {version}", "Host: proxy", "Connection: close"]
    if framing in ("length", "both"):
        head.append(f"Content-Length: {len(body)}")
    if framing in ("chunked", "both"):
        head.append("Transfer-Encoding: chunked")
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    head += [f"{name}: {value}" for name, value in headers]
    return "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body


def assert_json_error(status: int, headers: dict, body: bytes) -> dict:
    assert headers["content-type"].startswith("application/json"), (status, headers, body[:200])
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and 0 < len(err["message"]) <= MAX_MESSAGE
    assert isinstance(err["type"], str) and (err["code"] is None or isinstance(err["code"], (str, int)))
    return err


# -- the framework's own rejections, answered in JSON ------------------------------------------------------------

@pytest.mark.parametrize("data, status, code", [
    (request("GET", "/health", headers=[("X-Big", "a" * 20_000)]), 431, "header_too_large"),
    (request("GET", "/" + "p" * 10_000), 431, "header_too_large"),
    (request("GET", "/health", headers=[(f"X-H{i}", "1") for i in range(200)]), 431, "too_many_headers"),
    (request("G@T", "/health"), 400, "invalid_method"),
    (request("BREW", "/v1/chat/tiny", b"hi"), 400, "invalid_method"),
    (request("POST", "/v1/chat/tiny", b"hello", framing="both"), 400, "bad_http_request"),
    (b"POST /v1/chat/tiny HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
     400, "bad_http_request"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400, "invalid_method"),
    (request("POST", "/v1/chat/tiny", b"hi", [("Content-Encoding", "br")]), 415, "unsupported_content_encoding"),
    (request("GET", "/health", headers=[("Expect", "teapot")]), 417, "expectation_failed"),
    (request("GET", "/health", headers=[("Expect", "caf\xe9")]), 400, "bad_http_request"),
])
async def test_http_the_parser_refuses_gets_a_json_error_with_a_request_id(proxy_port, data, status, code):
    got, headers, body = await exchange(proxy_port, data)
    err = assert_json_error(got, headers, body)
    assert got == status and err["code"] == code and err["param"] is None, err
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    assert "aaaa" not in err["message"] and "pppp" not in err["message"]  # the input is not echoed


# -- bodies that used to crash the handler -------------------------------------------------------------------------

DEEP = b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"


@pytest.mark.parametrize("path, body, headers, status, param", [
    ("/v1/chat/tiny", DEEP, [("Content-Type", "application/json")], 400, None),
    ("/v1/chat/completions", DEEP, [], 400, None),
    ("/v1/chat/tiny", b'{"prompt": "\\ud800"}', [("Content-Type", "application/json")], 400, "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', [],
     400, "messages[0].content"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\udc00"]}', [], 400, "stop[0]"),
    ("/v1/chat/tiny", b"not gzip", [("Content-Encoding", "gzip")], 400, None),
    ("/v1/chat/completions", b"not deflate", [("Content-Encoding", "deflate")], 400, None),
    ("/v1/chat/tiny", b"hi", [("Content-Encoding", "compress")], 415, None),
    ("/v1/chat/tiny", gzip.compress(b"x" * (MAX_BODY + 1)), [("Content-Encoding", "gzip")], 413, None),
])
async def test_bodies_that_cannot_be_used_get_a_4xx_naming_the_field(proxy_port, path, body, headers, status,
                                                                        param):
    got, hdrs, raw = await exchange(proxy_port, request("POST", path, body, headers + [("X-Request-Id", "rid-7")]))
    err = assert_json_error(got, hdrs, raw)
    assert got == status and err["param"] == param, err
    assert hdrs["x-request-id"] == "rid-7"


async def test_a_body_that_fails_to_decode_is_answered_without_an_error_traceback_in_the_log(proxy_port, caplog):
    status, _, _ = await exchange(proxy_port, request("POST", "/v1/chat/tiny", b"not gzip" * 100,
                                                      [("Content-Encoding", "gzip")]))
    await asyncio.sleep(0.2)  # aiohttp tries to drain the rest of the body after the answer
    assert status == 400 and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_authorization_header_that_is_not_utf8_is_just_a_wrong_key():
    assert not ApiKeys(["sk-aaaaaaaa"]).accepts("caf\udce9")


async def test_compressed_bodies_are_decoded(proxy_port):
    body = json.dumps({"model": "tiny", "prompt": "hi"}).encode()
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        status, _, raw = await exchange(proxy_port, request("POST", "/v1/completions", packed,
                                                            [("Content-Encoding", encoding)]))
        assert status == 200 and json.loads(raw)["choices"][0]["text"] == "".join(CHUNKS)


async def test_unknown_paths_and_methods_get_string_codes_and_every_answer_a_request_id(proxy_port):
    status, headers, body = await exchange(proxy_port, request("GET", "/no/such", headers=[("X-Request-Id", "a.b")]))
    err = assert_json_error(status, headers, body)
    assert status == 404 and err == {**err, "code": "not_found", "param": None} and headers["x-request-id"] == "a.b"
    status, headers, body = await exchange(proxy_port, request("DELETE", "/v1/completions"))
    err = assert_json_error(status, headers, body)
    assert status == 405 and err["code"] == "method_not_allowed" and headers["allow"] == "POST"
    for path in ("/health", "/ready", "/v1/models", "/metrics"):
        status, headers, _ = await exchange(proxy_port, request("GET", path, headers=[("X-Request-Id", "bad id")]))
        assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), path


# -- anything at all -----------------------------------------------------------------------------------------------

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/chat/tiny", "/v1/chat/nope", "/v1/chat/", "/v1/models",
         "/v1/models/tiny", "/v1/models/nope", "/health", "/ready", "/metrics", "/", "/v1/chat/tiny/x",
         "/v1/chat/%ED%A0%80", "/v1/chat/t%00ny", "*", "//", "/v1/chat/completions?x=%ff"]
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "BREW", "G@T", ""]
SURROGATES = st.sampled_from(["\ud800", "\udfff", "\udc00x"])
TEXT = st.one_of(st.text(max_size=12), SURROGATES, st.sampled_from(["", "tiny", "user", "hi"]))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=12)
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "developer", "bot"]),
                                              "content": st.one_of(TEXT, JSON_VALUES), "name": TEXT})
REQUEST = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.just("tiny"), TEXT), "messages": st.one_of(st.lists(MESSAGE, max_size=3), JSON_VALUES),
    "prompt": st.one_of(TEXT, JSON_VALUES), "max_tokens": st.one_of(st.integers(-5, 100), JSON_VALUES),
    "temperature": JSON_VALUES, "top_p": JSON_VALUES, "top_k": JSON_VALUES, "seed": JSON_VALUES,
    "stop": JSON_VALUES, "stream": st.one_of(st.booleans(), JSON_VALUES), "n": JSON_VALUES,
    "stream_options": JSON_VALUES, "logprobs": JSON_VALUES, "tools": JSON_VALUES})
PLAIN = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20)
GOOD_FIELDS = st.fixed_dictionaries({"model": st.just("tiny")}, optional={
    "max_tokens": st.integers(1, 32), "temperature": st.floats(0, 2), "top_k": st.integers(0, 50),
    "stop": st.lists(PLAIN, min_size=1, max_size=4), "stream": st.booleans(), "seed": st.integers(0, 2**64 - 1)})
GOOD = st.one_of(st.builds(lambda text, d: {**d, "messages": [{"role": "user", "content": text}]}, PLAIN, GOOD_FIELDS),
                 st.builds(lambda text, d: {**d, "prompt": text}, PLAIN, GOOD_FIELDS))
BODIES = st.one_of(
    GOOD.map(lambda d: json.dumps(d).encode()),
    PLAIN.map(str.encode),
    st.tuples(REQUEST, st.dictionaries(TEXT, JSON_VALUES, max_size=2)).map(lambda t: json.dumps(
        {**t[1], **t[0]}).encode()),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b'{"prompt": ' + b"[" * n + b"]" * n + b"}"),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"{", b'{"prompt": NaN}', b'{"prompt": "x"}' * 2, b"x" * (MAX_BODY + 10)]))
ENCODINGS = st.sampled_from([None, None, "gzip", "deflate", "gzip-bogus", "deflate-bogus", "identity", "br",
                             "zstd", "gzip, gzip", "x-unknown"])
CONTENT_TYPES = st.one_of(st.sampled_from([None, "application/json", "text/plain", "application/json; charset=x",
                                           "multipart/form-data; boundary=b", "application/x-www-form-urlencoded",
                                           ";;=", "application/vnd.x+json", "*/*"]),
                          st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=30))
HEADER_NAMES = st.text("abcdefghijklmnopqrstuvwxyz-_@ ", min_size=1, max_size=16).filter(
    lambda n: n.strip().lower() not in ("connection", "content-length", "transfer-encoding", "host",
                                        "content-encoding", "content-type"))
HEADER_VALUES = st.one_of(st.text(st.characters(min_codepoint=0, max_codepoint=255, exclude_characters="\r\n"),
                                  max_size=40),
                          st.sampled_from(["a" * 9000, "rid-1", "bad id!", "Bearer x", "100-continue"]))
HEADERS = st.lists(st.tuples(st.one_of(HEADER_NAMES, st.sampled_from(["X-Request-Id", "Authorization",
                                                                       "Expect", "Accept", "Upgrade"])),
                             HEADER_VALUES), max_size=4)


def encode(body: bytes, encoding: str | None) -> tuple[bytes, list]:
    if encoding is None:
        return body, []
    packed = {"gzip": gzip.compress, "deflate": zlib.compress}.get(encoding.removesuffix("-bogus"))
    if packed and not encoding.endswith("-bogus"):
        body = packed(body)
    return body, [("Content-Encoding", encoding.removesuffix("-bogus"))]


# Near-valid requests (the generation paths, sane HTTP) reach the parsers and the replica; wild ones try every
# layer from the HTTP parser up.
SANE = st.fixed_dictionaries({
    "method": st.just("POST"), "path": st.sampled_from(PATHS[:3]), "body": BODIES,
    "encoding": st.sampled_from([None, "gzip", "deflate", "identity"]),
    "content_type": st.sampled_from([None, "application/json", "text/plain", "application/json; charset=utf-8"]),
    "headers": st.lists(st.tuples(st.sampled_from(["X-Request-Id", "Authorization", "Accept"]),
                                  st.sampled_from(["rid-1", "bad id!", "Bearer x", "caf\xe9"])), max_size=2),
    "framing": st.sampled_from(["length", "chunked"]), "version": st.sampled_from(["HTTP/1.1", "HTTP/1.0"])})
WILD = st.fixed_dictionaries({
    "method": st.sampled_from(METHODS),
    "path": st.one_of(st.sampled_from(PATHS), st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                      max_size=30).map(lambda s: "/" + s)),
    "body": BODIES, "encoding": ENCODINGS, "content_type": CONTENT_TYPES, "headers": HEADERS,
    "framing": st.sampled_from(["length", "length", "chunked", "both"]),
    "version": st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2"])})


@given(st.one_of(SANE, WILD))
async def test_any_request_gets_a_success_or_a_json_error_never_a_5xx(proxy_port, r):
    body, extra = encode(r["body"], r["encoding"])
    if r["content_type"] is not None:
        extra.append(("Content-Type", r["content_type"]))
    data = request(r["method"], r["path"], body, extra + r["headers"], r["framing"], r["version"])
    status, got, raw = await exchange(proxy_port, data)
    event(f"status {status}")  # --hypothesis-show-statistics shows the mix of answers
    assert status < 500, (status, raw[:300])
    assert got.get("x-request-id"), got
    if status >= 400 and r["method"] != "HEAD":
        assert_json_error(status, got, raw)
    health, _, _ = await exchange(proxy_port, request("GET", "/health"))
    assert health == 200


async def test_the_proxy_still_streams_after_all_that(proxy):
    status, headers, body = await exchange(proxy.port, request("POST", "/v1/chat/tiny", b"hello"))
    assert status == 200 and headers["transfer-encoding"] == "chunked" and body.decode() == "".join(CHUNKS)
    status, _, body = await exchange(proxy.port, request("GET", "/health"))
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert proxy.table.inflight(proxy.replica.address) == 0  # no request left holding the replica
