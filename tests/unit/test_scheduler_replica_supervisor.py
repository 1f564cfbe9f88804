"""The scheduler's replica bookkeeping: failure messages from logs, crash-loop window, restart backoff, hangs."""
from gridserve.scheduler.replica_supervisor import (CRASH_WINDOW, S, CrashWindow, HangWatch, describe_exit,
                                                    replica_threads, restart_backoff, tail_message)


def test_the_fatal_line_is_the_message_of_a_fatal_exit(tmp_path):
    log = tmp_path / "r.log"
    log.write_text("loading model\nTraceback (most recent call last):\n  File x\n"
                   "fatal: cannot load gpt2 from the hub: offline\nsome shutdown noise\n")
    assert tail_message(log) == "fatal: cannot load gpt2 from the hub: offline"


def test_without_a_fatal_line_the_last_lines_are_the_message(tmp_path):
    log = tmp_path / "r.log"
    log.write_text("one\ntwo\n\nthree\nfour\n")
    assert tail_message(log) == "two | three | four"


def test_only_output_of_the_latest_run_counts(tmp_path):
    log = tmp_path / "r.log"
    log.write_text("fatal: from an earlier run\n")
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write("Segmentation fault\n")
    assert tail_message(log, offset) == "Segmentation fault"
    assert tail_message(tmp_path / "missing.log") == ""


def test_more_than_five_crashes_within_a_minute_is_a_crash_loop():
    window = CrashWindow(limit=5, window=60)
    assert not any(window.add(t) for t in (0, 1, 3, 7, 15))
    assert window.add(31)


def test_crashes_spread_over_more_than_a_minute_are_not_a_loop():
    window = CrashWindow(limit=5, window=60)
    assert not any(window.add(t) for t in range(0, 600, 20))


def test_restart_backoff_doubles_is_capped_and_starts_over_after_a_long_run():
    backoff = restart_backoff()
    assert [backoff.next_delay(ran_s=1.0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert [backoff.next_delay(ran_s=1.0) for _ in range(1000)][-1] == 30
    assert backoff.next_delay(ran_s=CRASH_WINDOW + 1) == 1  # it ran past the crash window: start over


def test_exit_descriptions_name_signals():
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(-9) == "killed by SIGKILL"


def test_a_replica_unhealthy_for_the_grace_is_hung_and_recovery_resets_the_clock():
    watch = HangWatch(grace=10)
    assert watch.check(S.REPLICA_STATE_UNHEALTHY, 100) == ""
    assert watch.check(S.REPLICA_STATE_UNHEALTHY, 109) == ""
    assert watch.check(S.REPLICA_STATE_READY, 109.5) == ""
    assert watch.check(S.REPLICA_STATE_UNHEALTHY, 110) == ""
    assert "unhealthy for 10s" in watch.check(S.REPLICA_STATE_UNHEALTHY, 120)


def test_not_serving_is_a_hang_only_after_the_replica_was_ready():
    loading = HangWatch(grace=5)
    assert loading.check(S.REPLICA_STATE_STARTING, 0) == ""
    assert loading.check(S.REPLICA_STATE_STARTING, 600) == ""  # a slow model load is not a hang
    served = HangWatch(grace=5)
    served.check(S.REPLICA_STATE_READY, 0)
    assert served.check(S.REPLICA_STATE_STARTING, 1) == ""
    assert "not serving after it was ready" in served.check(S.REPLICA_STATE_STARTING, 6)


def test_a_lone_replica_uses_every_cpu_of_its_node_and_sharing_replicas_split_them():
    assert replica_threads(1, 2, 1) == 2    # make up on a 2-core machine: no idle core
    assert replica_threads(1, 2, 2) == 1    # two replicas: one core each
    assert replica_threads(2, 2, 2) == 2    # a model that reserves more keeps what it reserves
    assert replica_threads(0.1, 2, 500) == 1
    assert replica_threads(1, 16, 3) == 5


def test_threads_per_replica_is_validated_and_parsed_from_its_flag():
    import pytest
    from gridserve.common.errors import ConfigError
    from gridserve.scheduler.settings import parse_config
    assert parse_config(["--head", "127.0.0.1:1"]).threads_per_replica == 0  # automatic
    assert parse_config(["--head", "127.0.0.1:1", "--threads-per-replica", "1"]).threads_per_replica == 1
    with pytest.raises(ConfigError, match="--threads-per-replica"):
        parse_config(["--head", "127.0.0.1:1", "--threads-per-replica", "-1"])
