"""Cluster-wide rate limits: the head collects each proxy's use of every rate-limited API key and tells each
proxy what the others used, so a key's limit holds across all proxies."""
from __future__ import annotations

import time
from typing import Callable

from gridserve.v1 import head_pb2

FORGET_S = 600.0  # a proxy silent this long no longer counts


class KeyUsageBook:
    """The last cumulative use per key (by SHA-256 digest) each proxy reported."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._proxies: dict[str, tuple[float, dict[bytes, tuple[int, int]]]] = {}

    def report(self, proxy_id: str, usage) -> list[head_pb2.KeyUsage]:
        """Keeps `proxy_id`'s figures; returns, for each key it reported, the summed use of every other proxy."""
        now = self.clock()
        self._proxies = {p: v for p, v in self._proxies.items() if now - v[0] <= FORGET_S}
        if usage:
            self._proxies[proxy_id] = (now, {u.key_digest: (u.requests, u.tokens) for u in usage})
        out = []
        for u in usage:
            requests = tokens = 0
            for other, (_, figures) in self._proxies.items():
                if other != proxy_id and u.key_digest in figures:
                    requests += figures[u.key_digest][0]
                    tokens += figures[u.key_digest][1]
            out.append(head_pb2.KeyUsage(key_digest=u.key_digest, requests=requests, tokens=tokens))
        return out
