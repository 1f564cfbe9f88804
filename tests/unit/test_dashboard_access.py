"""Who may use the dashboard's API: reads open without API keys, else an API key or an admin key; actions only
with an admin key, the X-Gridserve-Admin header and a JSON body, and never when no admin key is configured."""
from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from gridserve.proxy.auth import ApiKeys
from gridserve.proxy.dashboard.access import Access
from gridserve.proxy.http_errors import HttpError

API, ADMIN = "sk-api-key-0001", "adm-admin-key-0001"
ACTION_HEADERS = {"Authorization": f"Bearer {ADMIN}", "X-Gridserve-Admin": "1", "Content-Type": "application/json"}


def req(method: str = "GET", headers: dict | None = None):
    return make_mocked_request(method, "/dashboard/api/x", headers=headers)


def refused(check, request) -> HttpError:
    with pytest.raises(HttpError) as e:
        check(request)
    return e.value


def test_reads_are_open_without_api_keys_and_need_one_with_them():
    Access(ApiKeys(), ApiKeys([ADMIN])).check_read(req())
    keyed = Access(ApiKeys([API]), ApiKeys([ADMIN]))
    assert refused(keyed.check_read, req()).status == 401
    assert refused(keyed.check_read, req(headers={"Authorization": "Bearer not-a-key-at-all"})).status == 401
    keyed.check_read(req(headers={"Authorization": f"Bearer {API}"}))
    keyed.check_read(req(headers={"Authorization": f"Bearer {ADMIN}"}))  # an operator with only the admin key can look too


def test_actions_are_refused_when_no_admin_key_is_configured():
    err = refused(Access(ApiKeys([API]), ApiKeys()).check_admin, req("POST", ACTION_HEADERS))
    assert err.status == 403 and err.code == "admin_disabled" and "--admin-key-file" in err.message


@pytest.mark.parametrize("change, status, code", [
    ({"X-Gridserve-Admin": None}, 403, "admin_header_missing"),  # a cross-site form cannot add it
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ({"Authorization": None}, 401, "invalid_admin_key"),
    ({"Authorization": f"Bearer {API}"}, 401, "invalid_admin_key"),  # an API key is not an admin key
])
def test_an_action_without_every_part_of_the_credential_is_refused(change, status, code):
    headers = {k: v for k, v in {**ACTION_HEADERS, **change}.items() if v is not None}
    err = refused(Access(ApiKeys([API]), ApiKeys([ADMIN])).check_admin, req("POST", headers))
    assert (err.status, err.code) == (status, code)


def test_an_action_with_the_admin_key_header_and_json_passes():
    Access(ApiKeys([API]), ApiKeys([ADMIN])).check_admin(req("POST", ACTION_HEADERS))
    Access(ApiKeys(), ApiKeys([ADMIN])).check_admin(req("POST", ACTION_HEADERS))
