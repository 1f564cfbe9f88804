"""Scaling a deployment down drains the replica it removes: its open streams finish whole, new requests
go elsewhere, then it stops."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from support.cluster import Cluster, RequestLoad, http, pid_alive
from support.waiting import wait_for


LONG = {"prompt": "Once upon a time", "max_tokens": 900, "temperature": 0}


@pytest.fixture
def long_configs(tmp_path, tiny_configs):
    """The tiny model with room for 900-token streams."""
    configs = json.loads(tiny_configs.read_text())
    configs["models"]["tiny"].update(context_length=1024, max_tokens_limit=1000)
    path = tmp_path / "model_configs.json"
    path.write_text(json.dumps(configs))
    return path


class Throttle:
    """Slows processes down (SIGSTOP most of the time, SIGCONT briefly) so that a tiny-model stream lasts
    seconds instead of milliseconds; everything runs again when the block ends."""

    def __init__(self, pids: list[int], run_s: float = 0.01, stop_s: float = 0.09):
        self.pids, self.run_s, self.stop_s = pids, run_s, stop_s
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, sig)

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                self._signal(signal.SIGSTOP)
                time.sleep(self.stop_s)
                self._signal(signal.SIGCONT)
                time.sleep(self.run_s)
        finally:
            self._signal(signal.SIGCONT)

    def __enter__(self) -> "Throttle":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.thread.join(10)


def stream(cluster: Cluster, out: list) -> None:
    started = time.monotonic()
    status, headers, pieces = http("POST", cluster.url("/v1/chat/tiny"), json.dumps(LONG),
                                   {"Content-Type": "application/json"}, timeout=120)
    out.append((status, headers.get("x-replica-id", ""), b"".join(pieces).decode(), time.monotonic() - started))


def test_scaling_down_lets_the_removed_replicas_stream_finish_whole_and_routes_nothing_new_to_it(
        tmp_path, long_configs):
    """The throttled stream outlasts the replica's own 5 s SIGTERM grace (with --drain-grace 0 it is cut
    after 5 s with a mid-stream error line), so only the scheduler's drain keeps it whole."""
    c = Cluster(tmp_path, long_configs)
    try:
        c.start_head()
        c.start_scheduler("n1", num_cpus=4, extra=["--drain-grace", "120"])
        c.cli("deploy", "tiny", "--replicas", "2")
        replicas = c.wait_ready("tiny", 2)
        reference = []
        stream(c, reference)
        assert reference[0][0] == 200 and reference[0][2], reference
        results: list = []
        with Throttle([r.pid for r in replicas]):
            threads = [threading.Thread(target=stream, args=(c, results)) for _ in range(2)]
            for n, t in enumerate(threads, 1):  # one stream on each: the proxy picks the one with fewer in flight
                t.start()
                wait_for(lambda: c.metric("gridserve_streams_in_flight", model="tiny") >= n, 60,
                         f"stream {n} under way")  # the proxy counts a stream from its first token
            t0 = time.monotonic()
            c.cli("scale", "tiny", "1")
            wait_for(lambda: len(c.replicas("tiny")) == 1, 30, "the head to drop one replica")
            removed = ({r.replica_id for r in replicas} - {r.replica_id for r in c.replicas("tiny")}).pop()
            with RequestLoad(c, body={"prompt": "hi", "max_tokens": 2}) as load:
                load.wait(3, timeout=120)
            for t in threads:
                t.join(120)
        victim = next(r for r in replicas if r.replica_id == removed)
        wait_for(lambda: not pid_alive(victim.pid), 60, "the drained replica to stop")
        stopped_s = time.monotonic() - t0
        lasted = ", ".join(f"{r[3]:.1f}s" for r in results)
        print(f"\ndrain: unthrottled stream {reference[0][3]:.1f}s; throttled streams lasted {lasted}; "
              f"the removed replica stopped {stopped_s:.1f}s after the scale-down")
        assert [r[0] for r in results] == [200, 200], results
        assert removed in {r[1] for r in results}, (removed, results)
        assert all(r[2] == reference[0][2] for r in results), "every stream is whole"
        assert load.failures() == [] and removed not in {r[3] for r in load.results}
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()
