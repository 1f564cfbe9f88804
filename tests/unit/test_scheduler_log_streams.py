"""The scheduler's side of `gridserve logs`: tails, whole files, following appends, and names that are not ids."""
import asyncio

import pytest

from gridserve.scheduler import log_streams as logs
from gridserve.scheduler.log_streams import LogStreams, log_path, tail_offset
from gridserve.v1 import head_pb2 as pb
from support.waiting import wait_until


@pytest.mark.parametrize("text,lines,want", [
    (b"a\nb\nc\n", 2, b"b\nc\n"),
    (b"a\nb\nc", 2, b"b\nc"),
    (b"a\nb\nc\n", 10, b"a\nb\nc\n"),
    (b"a\nb\nc\n", -1, b"a\nb\nc\n"),
    (b"a\nb\nc\n", 0, b""),
    (b"", 3, b""),
])
def test_tail_offset_finds_where_the_last_lines_begin(tmp_path, text, lines, want):
    path = tmp_path / "x.log"
    path.write_bytes(text)
    with open(path, "rb") as f:
        f.seek(tail_offset(f, lines))
        assert f.read() == want


def test_tail_offset_works_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "CHUNK_BYTES", 4)
    path = tmp_path / "x.log"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(50)))
    with open(path, "rb") as f:
        f.seek(tail_offset(f, 3))
        assert f.read() == b"line 47\nline 48\nline 49\n"


def test_only_plain_replica_ids_map_to_a_log_file(tmp_path):
    assert log_path(tmp_path, "smollm2-a1b2c3") == tmp_path / "logs" / "smollm2-a1b2c3.log"
    for bad in ("../etc/passwd", "a/b", "..", ".hidden", "", "x" * 300):
        assert log_path(tmp_path, bad) is None, bad


async def drain(streams: LogStreams, until) -> list[pb.LogChunk]:
    got = []
    while not got or not until(got[-1]):
        got.append((await asyncio.wait_for(streams.outbox.get(), 5)).log_chunk)
    return got


async def test_a_whole_log_then_eof_and_a_missing_one_is_an_error(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "m-000001.log").write_bytes(b"hello\nworld\n")
    streams = LogStreams(tmp_path)
    streams.open(pb.LogRequest(stream_id="s1", replica_id="m-000001", tail_lines=-1))
    got = await drain(streams, lambda c: c.eof or c.error)
    assert b"".join(c.data for c in got) == b"hello\nworld\n" and got[-1].eof
    streams.open(pb.LogRequest(stream_id="s2", replica_id="m-000002", tail_lines=-1))
    (err,) = await drain(streams, lambda c: c.error)
    assert err.stream_id == "s2" and "no log for this replica here" in err.error
    streams.open(pb.LogRequest(stream_id="s3", replica_id="../x", tail_lines=-1))
    (err,) = await drain(streams, lambda c: c.error)
    assert "is not a replica id" in err.error


async def test_follow_sends_what_is_appended_until_cancelled(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "FOLLOW_POLL_S", 0.02)
    (tmp_path / "logs").mkdir()
    path = tmp_path / "logs" / "m-000001.log"
    path.write_bytes(b"old 1\nold 2\n")
    streams = LogStreams(tmp_path)
    streams.open(pb.LogRequest(stream_id="s1", replica_id="m-000001", tail_lines=1, follow=True))
    assert (await drain(streams, lambda c: True))[0].data == b"old 2\n"
    with open(path, "ab") as f:
        f.write(b"new\n")
    assert (await drain(streams, lambda c: True))[0].data == b"new\n"
    streams.cancel("s1")
    await wait_until(lambda: streams.tasks == {}, 5, "the cancelled stream's task to end")
    assert streams.outbox.empty()
    await streams.close()
