"""`gridserve pull`'s progress view: a bar with percent, bytes, rate and time left per node, drawn in place on
a terminal and as plain lines otherwise."""
import io

from gridserve.cli.pull import Board, progress_line
from gridserve.v1 import head_pb2 as pb


def p(node: str, got: int, total: int = 100 << 20, rate: float = 10 << 20, **kw) -> pb.PullProgress:
    return pb.PullProgress(node_id=node, repo="org/m", revision="abcdef0123456789", done_bytes=got,
                           total_bytes=total, bytes_per_second=rate, files_done=2, files_total=7, **kw)


def test_a_progress_line_has_a_bar_percent_bytes_rate_and_time_left():
    assert progress_line(p("n1", 45 << 20), 2) == \
        "n1  [##########--------------]  45.0%  45.0MiB/100.0MiB  10.0MiB/s  6s left  files 2/7"
    assert progress_line(p("n1", 100 << 20, done=True), 4) == "n1    done   100.0MiB in 7 file(s), org/m@abcdef012345"
    assert progress_line(p("n1", 0, error="no route to the hub at http://x: refused"), 2) == \
        "n1  FAILED: no route to the hub at http://x: refused"


def test_a_terminal_gets_one_line_per_node_redrawn_in_place():
    out = io.StringIO()
    board = Board(out, live=True)
    board.update(p("n1", 10 << 20))
    board.update(p("node2", 20 << 20))
    board.update(p("n1", 30 << 20))
    text = out.getvalue()
    assert text.count("\x1b[1A") == 1 and text.count("\x1b[2A") == 1  # moved up over what it drew before
    last = text.rsplit("\x1b[2A", 1)[1]
    assert [line.split()[0] for line in last.replace("\x1b[2K", "").splitlines()] == ["n1", "node2"]
    assert "30.0MiB/100.0MiB" in last


def test_without_a_terminal_progress_is_plain_lines_not_more_often_than_every_two_seconds():
    out = io.StringIO()
    board = Board(out, live=False)
    for done in range(1, 6):
        board.update(p("n1", done << 20))
    board.update(p("n1", 100 << 20, done=True))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue() and lines[1].startswith("n1  done")
