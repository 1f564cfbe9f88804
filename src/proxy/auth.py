"""API keys: with keys set, /v1/* needs `Authorization: Bearer <key>`; /health, /ready and /metrics stay open."""
from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Callable

from aiohttp import web

from gridserve.common.eventlog import event
from gridserve.proxy.http_errors import HttpError

log = logging.getLogger("gridserve.proxy.auth")

PROTECTED_PREFIX = "/v1/"


class ApiKeys:
    """The accepted keys, kept as SHA-256 digests and compared in constant time (every key, every time)."""

    def __init__(self, keys: tuple[str, ...] | list[str] = ()):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, given: str) -> bool:
        digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()  # a header's non-UTF-8 bytes
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        return ok


def bearer_token(header: str) -> str:
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _refuse(request: web.Request, reason: str, message: str) -> HttpError:
    event(log, "auth_refused", logging.WARNING, path=request.path, reason=reason, peer=request.remote or "")
    return HttpError(401, "authentication_error", message, code="invalid_api_key",
                     headers={"WWW-Authenticate": "Bearer"})


def auth_middleware(keys: ApiKeys, on_refused: Callable[[], None] = lambda: None):
    """Refuses /v1/* requests without an accepted key (401 in the error shape of the path's API)."""

    @web.middleware
    async def require_key(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIX):
            token = bearer_token(request.headers.get("Authorization", ""))
            if not token:
                on_refused()
                raise _refuse(request, "missing", "missing API key: send the header 'Authorization: Bearer <key>'")
            if not keys.accepts(token):
                on_refused()
                raise _refuse(request, "wrong", "invalid API key")
        return await handler(request)

    return require_key
