"""Per-API-key rate limits on the proxy: requests and tokens per minute as token buckets, OpenAI's
x-ratelimit-* headers, and 429 with Retry-After over the limit."""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from aiohttp import web

from gridserve.common.api_key_files import KeyLimits
from gridserve.common.eventlog import event
from gridserve.proxy.auth import bearer_token
from gridserve.proxy.http_errors import HttpError
from gridserve.v1 import head_pb2

log = logging.getLogger("gridserve.proxy.rate_limits")

TOKENS_USED = web.RequestKey("tokens_used", int)  # prompt + completion tokens, set by the relay when done
_HEADERS = web.RequestKey("ratelimit_headers", dict)  # the x-ratelimit-* headers of an admitted request


def duration(seconds: float) -> str:
    """Seconds as OpenAI writes them in x-ratelimit-reset-*, rounded up to a whole second: 0s, 30s, 1m0s, 1h2m3s."""
    s = max(0, math.ceil(seconds - 1e-9))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


class Bucket:
    """`per_minute` units a minute, refilled continuously; full at start. The level may go below zero when a
    charge comes after the fact (tokens are known only once a generation ends)."""

    def __init__(self, per_minute: int, now: float):
        self.limit = per_minute
        self.rate = per_minute / 60.0  # units per second
        self.level = float(per_minute)
        self.at = now

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_s(self, need: float) -> float:
        """Seconds until the level reaches `need`."""
        return max(0.0, (need - self.level) / self.rate)

    def headers(self, kind: str) -> dict[str, str]:
        return {f"x-ratelimit-limit-{kind}": str(self.limit),
                f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.level))),
                f"x-ratelimit-reset-{kind}": duration(self.wait_s(self.limit))}


@dataclass
class KeyState:
    """The buckets of one key: requests, tokens, or both; what this proxy admitted (cumulative, reported to
    the head) and the other proxies' use last heard from the head (None: not yet)."""
    requests: Bucket | None
    tokens: Bucket | None
    used_requests: int = 0
    used_tokens: int = 0
    others: tuple[int, int] | None = None

    def refill(self, now: float) -> None:
        for b in (self.requests, self.tokens):
            if b is not None:
                b.refill(now)

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.requests is not None:
            out.update(self.requests.headers("requests"))
        if self.tokens is not None:
            out.update(self.tokens.headers("tokens"))
        return out


class RateLimiter:
    """The buckets of every limited key (found by the SHA-256 of the key, never kept in the clear)."""

    def __init__(self, limits: Mapping[str, KeyLimits], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        now = clock()
        self._keys = {_digest(key): KeyState(Bucket(lim.rpm, now) if lim.rpm else None,
                                             Bucket(lim.tpm, now) if lim.tpm else None)
                      for key, lim in limits.items() if lim}

    def __bool__(self) -> bool:
        return bool(self._keys)

    def admit(self, key: str) -> KeyState | None:
        """Takes one request from the key's buckets and returns them (None: the key has no limits), or raises
        HttpError 429 naming the exhausted limit, with Retry-After and the x-ratelimit-* headers."""
        state = self._keys.get(_digest(key))
        if state is None:
            return None
        state.refill(self.clock())
        waits = []
        if state.requests is not None and state.requests.level < 1:
            waits.append(("requests", state.requests.wait_s(1), state.requests.limit))
        if state.tokens is not None and state.tokens.level <= 0:
            waits.append(("tokens", state.tokens.wait_s(0), state.tokens.limit))
        if waits:
            kind, wait, limit = max(waits, key=lambda w: w[1])
            retry = duration(wait)
            raise HttpError(429, kind, f"rate limit reached for {kind} per minute (limit {limit}) of this API "
                            f"key; try again in {retry}", code="rate_limit_exceeded",
                            headers={"Retry-After": str(max(1, math.ceil(wait - 1e-9))), **state.headers()})
        if state.requests is not None:
            state.requests.level -= 1
        state.used_requests += 1
        return state

    def charge(self, state: KeyState, tokens: int) -> None:
        """Takes the tokens a finished request used from the key's token bucket (it may go below zero)."""
        if tokens > 0:
            state.used_tokens += tokens
        if state.tokens is not None and tokens > 0:
            state.refill(self.clock())
            state.tokens.level -= tokens

    def usage(self) -> list[head_pb2.KeyUsage]:
        """What this proxy admitted per limited key since it started, for the head."""
        return [head_pb2.KeyUsage(key_digest=d, requests=s.used_requests, tokens=s.used_tokens)
                for d, s in self._keys.items()]

    def absorb(self, others: list[head_pb2.KeyUsage]) -> None:
        """Takes from each key's buckets what the other proxies used since the last report, so that a key's
        limit holds across the cluster (a second late at most). The first figures heard are only a baseline."""
        now = self.clock()
        for u in others:
            state = self._keys.get(u.key_digest)
            if state is None:
                continue
            seen = (u.requests, u.tokens)
            if state.others is not None:
                state.refill(now)
                new_requests, new_tokens = u.requests - state.others[0], u.tokens - state.others[1]
                if state.requests is not None and new_requests > 0:
                    state.requests.level -= new_requests
                if state.tokens is not None and new_tokens > 0:
                    state.tokens.level -= new_tokens
            state.others = seen


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def rate_limit_middleware(limiter: RateLimiter, on_limited: Callable[[str], None] = lambda kind: None):
    """Admits each generation request (POST /v1/*) of a limited key or answers 429; charges its tokens
    when it ends. Runs after the auth middleware, so the key is a known one."""

    @web.middleware
    async def limit(request: web.Request, handler) -> web.StreamResponse:
        if request.method != "POST" or not request.path.startswith("/v1/"):
            return await handler(request)
        try:
            state = limiter.admit(bearer_token(request.headers.get("Authorization", "")))
        except HttpError as e:
            on_limited(e.error_type)
            event(log, "rate_limited", logging.WARNING, path=request.path, limit=e.error_type,
                  retry_after_s=e.headers["Retry-After"], peer=request.remote or "")
            raise
        if state is None:
            return await handler(request)
        request[_HEADERS] = state.headers()
        try:
            return await handler(request)
        finally:
            limiter.charge(state, request.get(TOKENS_USED, 0))

    return limit


async def add_ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the x-ratelimit-* headers of an admitted request, on its answer (streamed too)."""
    for name, value in request.get(_HEADERS, {}).items():
        response.headers.setdefault(name, value)
