"""Files other processes read: atomic writes (never a partial file), 0600 secrets, port files, and the names
inside a state dir and a work dir."""
from __future__ import annotations

import json
import os
import stat

import pytest

from gridserve.common.files import read_port_file, write_atomic, write_json_atomic, write_port_file
from gridserve.common.paths import StateDir, WorkDir


def test_an_atomic_write_replaces_the_whole_file_and_leaves_no_tmp_file(tmp_path):
    path = tmp_path / "sub" / "head.json"
    write_json_atomic(path, {"grpc_address": "127.0.0.1:1"})
    write_json_atomic(path, {"grpc_address": "127.0.0.1:2"})
    assert json.loads(path.read_text()) == {"grpc_address": "127.0.0.1:2"}
    assert os.listdir(path.parent) == ["head.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_tmp_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    write_atomic(path, "old\n")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["f"]


def test_a_private_file_is_owner_only_even_over_a_leftover_tmp_file(tmp_path):
    path = tmp_path / "cluster-token"
    leftover = tmp_path / f".cluster-token.{os.getpid()}.tmp"
    leftover.write_text("stale")
    leftover.chmod(0o644)
    write_atomic(path, "secret\n", private=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "secret\n"


@pytest.mark.parametrize("text, port", [("8000\n", 8000), ("", None), ("80x", None), ("0", None),
                                        ("70000", None), ("-1", None)])
def test_a_port_file_reads_as_a_valid_port_or_none(tmp_path, text, port):
    (tmp_path / "p.port").write_text(text)
    assert read_port_file(tmp_path / "p.port") == port


def test_a_written_port_file_reads_back_and_a_missing_one_is_none(tmp_path):
    assert read_port_file(tmp_path / "run" / "r.port") is None
    write_port_file(tmp_path / "run" / "r.port", 50123)
    assert read_port_file(tmp_path / "run" / "r.port") == 50123


def test_state_and_work_dirs_name_their_files(tmp_path):
    state = StateDir(str(tmp_path))
    assert [p.name for p in (state.db, state.head_json, state.cluster_token, state.api_keys, state.proxy_port,
                             state.head_log)] == ["state.db", "head.json", "cluster-token", "api-keys",
                                                  "proxy.port", "head.log"]
    assert all(p.parent == tmp_path for p in (state.db, state.head_json))
    work = WorkDir(tmp_path)
    assert work.replica_log("m-1") == tmp_path / "logs" / "m-1.log"
    assert work.replica_port("m-1") == tmp_path / "run" / "m-1.port"
    work.create()
    assert work.logs.is_dir() and work.run.is_dir()
