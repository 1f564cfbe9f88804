"""Who may use the dashboard's API: reads need an API key (or an admin key) when API keys are configured;
actions need an admin key, a custom header and a JSON body, which a cross-site form or image cannot send."""
from __future__ import annotations

import logging

from aiohttp import web

from gridserve.common.eventlog import event
from gridserve.proxy.auth import ApiKeys, bearer_token
from gridserve.proxy.http_errors import HttpError

log = logging.getLogger("gridserve.proxy.dashboard")

ADMIN_HEADER = "X-Gridserve-Admin"


def _refuse(request: web.Request, status: int, reason: str, message: str, code: str) -> HttpError:
    event(log, "dashboard_refused", logging.WARNING, path=request.path, reason=reason, peer=request.remote or "")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    error_type = "authentication_error" if status == 401 else "permission_error"
    return HttpError(status, error_type, message, code=code, headers=headers)


class Access:
    """The API keys and admin keys the proxy was given, and the checks of the dashboard's endpoints."""

    def __init__(self, api_keys: ApiKeys, admin_keys: ApiKeys):
        self.api_keys = api_keys
        self.admin_keys = admin_keys

    def check_read(self, request: web.Request) -> None:
        """Open without API keys; else `Authorization: Bearer` with an API key or an admin key."""
        if not self.api_keys:
            return
        token = bearer_token(request.headers.get("Authorization", ""))
        if not token:
            raise _refuse(request, 401, "missing", "missing API key: send the header 'Authorization: Bearer <key>' "
                          "(in the dashboard: Credentials)", "invalid_api_key")
        if not (self.api_keys.accepts(token) or self.admin_keys.accepts(token)):
            raise _refuse(request, 401, "wrong", "invalid API key", "invalid_api_key")

    def check_admin(self, request: web.Request) -> None:
        """Actions: an admin key as bearer token, the X-Gridserve-Admin header and a JSON content type."""
        if not self.admin_keys:
            raise _refuse(request, 403, "disabled", "dashboard actions are disabled: start the head (or "
                          "`gridserve up`) with --admin-key-file to allow them", "admin_disabled")
        if request.headers.get(ADMIN_HEADER, "") != "1":
            raise _refuse(request, 403, "no_header", f"an action needs the header '{ADMIN_HEADER}: 1'",
                          "admin_header_missing")
        if request.content_type != "application/json":
            raise HttpError(415, "invalid_request_error", "an action's body must be JSON "
                            "(Content-Type: application/json)", code="unsupported_media_type")
        token = bearer_token(request.headers.get("Authorization", ""))
        if not token:
            raise _refuse(request, 401, "missing", "missing admin key: send 'Authorization: Bearer <admin key>' "
                          "(in the dashboard: Credentials)", "invalid_admin_key")
        if not self.admin_keys.accepts(token):
            raise _refuse(request, 401, "wrong", "invalid admin key", "invalid_admin_key")
