"""A head killed with SIGKILL: its proxy keeps serving, and a restarted head adopts that proxy and the
replicas still running instead of starting new ones."""
from __future__ import annotations

import time


from support.cluster import READY, Cluster, RequestLoad, pid_alive
from support.waiting import free_port, wait_for



def test_a_killed_head_restarts_and_adopts_its_proxy_and_replicas_while_requests_succeed(tmp_path, tiny_configs):
    c = Cluster(tmp_path, tiny_configs)
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
    proxy_pid = 0
    try:
        c.start_head(extra=ports)
        c.start_scheduler("n1", num_cpus=4)
        c.cli("deploy", "tiny", "--replicas", "2")
        before = {r.replica_id: r.pid for r in c.wait_ready("tiny", 2)}
        proxy_pid = c.status().proxy_pid
        with RequestLoad(c) as load:
            load.wait(2)
            c.kill("head")  # SIGKILL
            t0, done_before = time.monotonic(), len(load.results)
            load.wait(done_before + 5)
            served_while_down = len(load.results) - done_before
            c.relaunch_head()  # same state dir and ports
            head_up_s = time.monotonic() - t0

            def adopted():
                st = c.status()
                ready = {r.replica_id: r.pid for r in st.replicas if r.state == READY}
                return ready == before and st.proxy_pid == proxy_pid and st
            wait_for(adopted, 60, "the restarted head to report the same replicas and proxy")
            adopted_s = time.monotonic() - t0
            load.wait(len(load.results) + 3)
        print(f"\nhead kill -9: {served_while_down} requests served while it was down; restarted head up after "
              f"{head_up_s:.1f}s, replicas and proxy adopted {adopted_s - head_up_s:.1f}s after its start; "
              f"{len(load.results)} requests, slowest {max(r[2] for r in load.results):.1f}s")
        assert load.failures() == []
        assert c.status().proxy_restarts == 0
        c.cli("scale", "tiny", "3")
        ready = c.wait_ready("tiny", 3)
        assert set(before) < {r.replica_id for r in ready}
        with RequestLoad(c) as load:
            load.wait(6)
        assert load.failures() == []
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()
    assert not pid_alive(proxy_pid), "the head's shutdown stops the proxy it adopted"
