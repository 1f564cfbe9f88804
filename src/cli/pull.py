"""`gridserve pull`: fetches a hub model into nodes' HF caches, with a live progress bar per node."""
from __future__ import annotations

import json
import signal
import sys
import time
from typing import Iterator, TextIO

from gridserve.cli import render
from gridserve.cli.headclient import Head, _error
from gridserve.v1 import head_pb2

BAR_WIDTH = 24
PLAIN_EVERY_S = 2.0  # without a terminal, a progress line per node at most this often


def stream_pull(head: Head, request: head_pb2.PullRequest) -> Iterator[head_pb2.PullProgress]:
    """AdminService.Pull: every node's progress as the head relays it; failures become one CliError."""
    import grpc

    from gridserve.v1 import head_pb2_grpc

    ch = head.channel()
    try:
        try:
            for progress in head_pb2_grpc.AdminServiceStub(ch).Pull(request, metadata=head.metadata):
                yield progress
        except grpc.RpcError as e:
            raise _error(e, head) from None
    finally:
        ch.close()


def progress_dict(p: head_pb2.PullProgress) -> dict:
    """One progress message for --output json, with numbers as numbers (proto JSON writes uint64 as strings)."""
    return {"node_id": p.node_id, "repo": p.repo, "revision": p.revision, "done_bytes": p.done_bytes,
            "total_bytes": p.total_bytes, "bytes_per_second": round(p.bytes_per_second, 1),
            "files_done": p.files_done, "files_total": p.files_total, "done": p.done, "error": p.error}


def rate(bps: float) -> str:
    return f"{render.mem(bps)}/s" if bps >= 1 else "-"


def eta(p: head_pb2.PullProgress) -> str:
    left = p.total_bytes - p.done_bytes
    if p.bytes_per_second < 1 or left <= 0:
        return "-"
    s = int(left / p.bytes_per_second + 0.5)
    return f"{s}s" if s < 120 else f"{s // 60}m{s % 60:02d}s" if s < 7200 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(p: head_pb2.PullProgress, width: int) -> str:
    """One node's state: a bar, percent, bytes, rate and time left; or how it ended."""
    node = p.node_id.ljust(width)
    if p.error:
        return f"{node}  FAILED: {p.error}"
    size = render.mem(p.total_bytes) if p.total_bytes else "0B"
    if p.done:
        return f"{node}  done   {size} in {p.files_total} file(s), {p.repo}@{p.revision[:12]}"
    frac = p.done_bytes / p.total_bytes if p.total_bytes else 0.0
    filled = int(frac * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    return (f"{node}  [{bar}] {frac * 100:5.1f}%  {render.mem(p.done_bytes) if p.done_bytes else '0B'}/{size}"
            f"  {rate(p.bytes_per_second)}  {eta(p)} left  files {p.files_done}/{p.files_total}")


class Board:
    """The latest progress of each node, drawn in place on a terminal or as plain lines otherwise."""

    def __init__(self, out: TextIO, live: bool):
        self.out, self.live = out, live
        self.latest: dict[str, head_pb2.PullProgress] = {}
        self.printed_at: dict[str, float] = {}
        self.drawn = 0

    def update(self, p: head_pb2.PullProgress) -> None:
        self.latest[p.node_id] = p
        width = max(len(n) for n in self.latest)
        if self.live:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}A")
            for q in self.latest.values():
                self.out.write("\x1b[2K" + progress_line(q, width) + "\n")
            self.drawn = len(self.latest)
        else:
            now = time.monotonic()
            if p.done or p.error or now - self.printed_at.get(p.node_id, 0.0) >= PLAIN_EVERY_S:
                self.printed_at[p.node_id] = now
                self.out.write(progress_line(p, width) + "\n")
        self.out.flush()


def cmd_pull(args) -> int:
    """Streams the pull; exit code 1 when any node failed. With --output json, one object per progress message."""
    request = head_pb2.PullRequest(model=args.model, node=args.node or "", revision=args.revision or "")
    signal.signal(signal.SIGINT, _exit_on_interrupt)
    board = Board(sys.stdout, live=sys.stdout.isatty() and args.output != "json")
    ended: dict[str, head_pb2.PullProgress] = {}
    for p in stream_pull(args.head, request):
        if args.output == "json":
            print(json.dumps(progress_dict(p)), flush=True)
        else:
            board.update(p)
        if p.done or p.error:
            ended[p.node_id] = p
    failed = sorted(n for n, p in ended.items() if p.error)
    if args.output != "json":
        repo = next(iter(ended.values())).repo if ended else args.model
        print(f"pull of {repo} failed on {len(failed)} of {len(ended)} node(s): {', '.join(failed)}" if failed
              else f"pulled {repo} to {len(ended)} node(s)")
    return 1 if failed else 0


def _exit_on_interrupt(signum, frame) -> None:
    """Ctrl-C leaves at once (the head cancels the pull on the nodes; what was fetched stays for a resume)."""
    import os

    sys.stdout.flush()
    os._exit(130)
