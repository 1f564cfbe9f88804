"""A replica that stops answering while its process lives is killed by its scheduler and replaced."""
from __future__ import annotations

import os
import signal
import time


from support.cluster import READY, Cluster, RequestLoad, pid_alive
from support.waiting import wait_for



def test_a_stopped_replica_is_killed_as_hung_and_replaced_while_requests_succeed(tmp_path, tiny_configs):
    c = Cluster(tmp_path, tiny_configs)
    stopped = 0
    try:
        c.start_head()
        c.start_scheduler("n1", num_cpus=4, extra=["--unhealthy-grace", "1", "--probe-interval", "0.5",
                                                          "--probe-timeout", "0.5"])
        c.cli("deploy", "tiny", "--replicas", "2")
        victim = c.wait_ready("tiny", 2)[0]
        with RequestLoad(c) as load:
            load.wait(2)
            stopped, t0 = victim.pid, time.monotonic()
            os.kill(stopped, signal.SIGSTOP)  # the gRPC server no longer answers: hung
            messages, killed = set(), []

            def replaced():
                if not killed and not pid_alive(stopped):
                    killed.append(time.monotonic() - t0)
                r = next(r for r in c.replicas("tiny") if r.replica_id == victim.replica_id)
                messages.add(r.message)
                return r.state == READY and r.pid != stopped and r
            new = wait_for(replaced, 90, "the hung replica to be replaced by a READY one", interval=0.1)
            replaced_s = time.monotonic() - t0
            load.wait(len(load.results) + 2)
        print(f"\nhung replica: killed {killed[0]:.1f}s after SIGSTOP, READY again after {replaced_s:.1f}s; "
              f"{len(load.results)} requests, slowest {max(r[2] for r in load.results):.1f}s")
        assert new.restarts >= 1
        assert any("hung, killed by the scheduler" in m for m in messages), messages
        assert load.failures() == []
    except BaseException:
        print(c.logs())
        raise
    finally:
        if stopped and pid_alive(stopped):
            os.kill(stopped, signal.SIGKILL)
        c.stop()
