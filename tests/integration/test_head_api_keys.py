"""API keys given to the head reach the proxy it starts through a 0600 file, never the proxy's command line."""
import json
from pathlib import Path

import pytest

from support.cluster import Cluster, http
from support.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

KEY = "sk-head-given-key-1234"


def test_the_head_hands_its_keys_to_the_proxy_in_a_private_file(tmp_path, tiny_configs):
    c = Cluster(tmp_path, tiny_configs)
    try:
        c.start_head(["--api-key", KEY])
        pid = wait_for(lambda: c.status().proxy_pid, 10, "the proxy's pid")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        key_file = tmp_path / "state" / "api-keys"
        assert KEY.encode() not in b" ".join(argv)
        assert argv[argv.index(b"--api-key-file") + 1] == str(key_file).encode()
        assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.read_text() == f"{KEY}\n"

        status, headers, body = http("GET", c.url("/v1/models"))
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(b"".join(body))["error"]["code"] == "invalid_api_key"
        status, _, _ = http("GET", c.url("/v1/models"), headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200
        assert http("GET", c.url("/health"))[0] == 200
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()
