"""Per-key rate limits: keys-file syntax, token buckets with a fake clock, OpenAI's header values."""
import pytest

from gridserve.common.api_key_files import KeyLimits, parse_key_line, read_key_entries, write_key_file
from gridserve.common.errors import ConfigError
from gridserve.proxy.http_errors import HttpError
from gridserve.proxy.rate_limits import RateLimiter, duration

KEY = "sk-limited-key-1"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_key_lines_take_optional_rpm_and_tpm():
    assert parse_key_line("sk-plain-key-1", "f") == ("sk-plain-key-1", KeyLimits())
    assert parse_key_line("sk-plain-key-1  rpm=60 tpm=10000", "f") == ("sk-plain-key-1", KeyLimits(60, 10000))
    assert parse_key_line("sk-plain-key-1 tpm=5", "f") == ("sk-plain-key-1", KeyLimits(None, 5))
    for bad in ("k rpm=1", "sk-plain-key-1 rpm=0", "sk-plain-key-1 rpm=x", "sk-plain-key-1 rps=3",
                "sk-plain-key-1 rpm=1 rpm=2", "sk-plain-key-1 rpm"):
        with pytest.raises(ConfigError):
            parse_key_line(bad, "f")


def test_written_key_file_keeps_the_limits(tmp_path):
    path = tmp_path / "keys"
    write_key_file(path, ["sk-plain-key-1", KEY], {KEY: KeyLimits(rpm=2, tpm=10)})
    assert path.read_text() == f"sk-plain-key-1\n{KEY} rpm=2 tpm=10\n"
    assert read_key_entries(path) == [("sk-plain-key-1", KeyLimits()), (KEY, KeyLimits(2, 10))]


def test_durations_are_written_as_openai_does():
    assert [duration(s) for s in (0, 0.2, 1, 29.99, 30, 60, 84, 3723)] == \
        ["0s", "1s", "1s", "30s", "30s", "1m0s", "1m24s", "1h2m3s"]


def test_requests_per_minute_refuse_with_exact_headers_and_refill():
    clock = Clock()
    limiter = RateLimiter({KEY: KeyLimits(rpm=2)}, clock)
    assert limiter.admit("sk-other-key-9") is None
    assert limiter.admit(KEY).headers() == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
                                            "x-ratelimit-reset-requests": "30s"}
    assert limiter.admit(KEY).headers()["x-ratelimit-reset-requests"] == "1m0s"
    clock.t += 10
    with pytest.raises(HttpError) as e:
        limiter.admit(KEY)
    assert e.value.status == 429 and e.value.error_type == "requests" and e.value.code == "rate_limit_exceeded"
    assert e.value.headers == {"Retry-After": "20", "x-ratelimit-limit-requests": "2",
                               "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "50s"}
    clock.t += 20
    assert limiter.admit(KEY).headers()["x-ratelimit-remaining-requests"] == "0"


def test_tokens_are_charged_after_the_answer_and_refuse_until_paid_back():
    clock = Clock()
    limiter = RateLimiter({KEY: KeyLimits(tpm=10)}, clock)
    state = limiter.admit(KEY)
    assert state.headers() == {"x-ratelimit-limit-tokens": "10", "x-ratelimit-remaining-tokens": "10",
                               "x-ratelimit-reset-tokens": "0s"}
    limiter.charge(state, 7)
    assert limiter.admit(KEY).headers()["x-ratelimit-remaining-tokens"] == "3"
    limiter.charge(state, 7)  # the level is now -4: 24 s (at 10/min) until it is above zero again
    with pytest.raises(HttpError) as e:
        limiter.admit(KEY)
    assert e.value.error_type == "tokens" and e.value.headers["Retry-After"] == "24"
    assert e.value.headers["x-ratelimit-reset-tokens"] == "1m24s"
    clock.t += 24.5
    assert limiter.admit(KEY) is not None


def test_other_proxies_use_reported_by_the_head_is_taken_from_the_buckets_after_a_baseline():
    from gridserve.v1 import head_pb2
    clock = Clock()
    limiter = RateLimiter({KEY: KeyLimits(rpm=10, tpm=100)}, clock)
    limiter.charge(limiter.admit(KEY), 5)
    (mine,) = limiter.usage()
    assert (mine.requests, mine.tokens) == (1, 5)
    digest = mine.key_digest
    limiter.absorb([head_pb2.KeyUsage(key_digest=digest, requests=50, tokens=500)])  # baseline: history
    assert limiter.admit(KEY).headers()["x-ratelimit-remaining-requests"] == "8"
    limiter.absorb([head_pb2.KeyUsage(key_digest=digest, requests=58, tokens=560),
                    head_pb2.KeyUsage(key_digest=b"unknown", requests=9, tokens=9)])
    with pytest.raises(HttpError) as e:  # 8 more requests elsewhere: none left here
        limiter.admit(KEY)
    assert e.value.error_type == "requests" and e.value.headers["x-ratelimit-remaining-tokens"] == "35"
    limiter.absorb([head_pb2.KeyUsage(key_digest=digest, requests=3, tokens=0)])  # a head restart: no refund
    assert limiter.usage()[0].requests == 2


def test_the_head_sums_the_other_proxies_use_per_key():
    from gridserve.head.key_usage import KeyUsageBook
    from gridserve.v1 import head_pb2
    book = KeyUsageBook(clock=Clock())
    u = head_pb2.KeyUsage
    assert [(x.requests, x.tokens) for x in book.report("a", [u(key_digest=b"k", requests=2, tokens=20)])] == [(0, 0)]
    book.report("b", [u(key_digest=b"k", requests=3, tokens=30), u(key_digest=b"j", requests=1, tokens=1)])
    book.report("c", [u(key_digest=b"k", requests=4, tokens=40)])
    others = book.report("a", [u(key_digest=b"k", requests=5, tokens=50)])
    assert [(x.key_digest, x.requests, x.tokens) for x in others] == [(b"k", 7, 70)]
