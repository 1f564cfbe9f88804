"""The autoscaling rule over a load history: targets, delays (hysteresis), bounds, zero, and the settings."""
import pytest

from gridserve.common.autoscaling_config import AutoscalingConfig
from gridserve.common.errors import ConfigError
from gridserve.common.model_config import ModelConfig
from gridserve.head.autoscaler import LoadSample, decide

CFG = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=2, upscale_delay_s=10,
                        downscale_delay_s=30, look_back_period_s=5)


def steady(load, start=0.0, end=60.0, step=1.0, history=None):
    history = list(history or [])
    t = start
    while t <= end:
        history.append(LoadSample(t, load))
        t += step
    return history


def test_a_sustained_load_scales_up_to_load_over_target_after_the_upscale_delay():
    h = steady(1, 0, 20) + steady(8, 21, 30)  # 8 ongoing from t=21: wants 4 replicas
    assert decide(CFG, 1, h, 30) is None  # 10 s of the window still hold moments that wanted 1
    h += steady(8, 31, 36)
    d = decide(CFG, 1, h, 36)
    assert d.target == 4 and d.reason == "load 8.0 > 1 x 2 ongoing requests for 10s"


def test_up_goes_to_the_least_count_the_whole_window_wanted():
    h = steady(6, 0, 5) + steady(16, 6, 12)  # wants 3, then 8 (averaged over 5 s in between)
    assert decide(CFG, 1, h, 12).target == 3


def test_a_load_wavering_around_a_boundary_keeps_the_count():
    h = [LoadSample(t, 5 if t % 20 < 10 else 3) for t in range(0, 600)]  # wants 3, then 2, then 3...
    for now in range(100, 600, 7):
        assert decide(CFG, 3, [s for s in h if s.at <= now], now) is None


def test_down_only_after_the_downscale_delay_and_never_below_min():
    h = steady(8, 0, 10) + steady(0, 11, 35)
    assert decide(CFG, 4, h, 35) is None  # the last 30 s still held moments that wanted 4
    h += steady(0, 36, 45)
    d = decide(CFG, 4, h, 45)
    assert d.target == 1 and "needs only 1" in d.reason


def test_count_stays_within_max_and_is_brought_back_into_a_changed_range():
    assert decide(CFG, 1, steady(100, 0, 20), 20).target == 8
    assert decide(CFG, 8, steady(100, 0, 20), 20) is None
    assert decide(CFG, 12, [], 0).target == 8
    assert decide(AutoscalingConfig(min_replicas=3, max_replicas=5), 1, [], 0).target == 3


def test_no_history_no_decision():
    assert decide(CFG, 2, [], 100) is None
    assert decide(CFG, 2, steady(100, 95, 100), 100) is None  # only 5 s of the 10 s upscale delay seen


def test_from_zero_any_demand_scales_up_at_once_and_idle_goes_back_to_zero():
    zero = AutoscalingConfig(min_replicas=0, max_replicas=4, downscale_delay_s=30, look_back_period_s=5)
    d = decide(zero, 0, [LoadSample(100, 1)], 100)
    assert d.target == 1 and d.reason == "1 request(s) waiting with no replica"
    assert decide(zero, 0, [LoadSample(100, 5)], 100).target == 3
    assert decide(zero, 0, steady(0, 0, 100), 100) is None
    assert decide(zero, 1, steady(1, 0, 50) + steady(0, 51, 79), 79) is None  # idle 28 s (+5 s look-back)
    assert decide(zero, 1, steady(1, 0, 50) + steady(0, 51, 90), 90).target == 0


def test_settings_use_ray_serve_names_defaults_and_ranges():
    a = AutoscalingConfig.from_dict({"min_replicas": 0, "max_replicas": 4})
    assert (a.target_ongoing_requests, a.upscale_delay_s, a.downscale_delay_s, a.start_replicas) == (2, 30, 600, 0)
    over = AutoscalingConfig.from_dict({"max_replicas": 6, "downscale_delay_s": 5}, base=a)
    assert (over.min_replicas, over.max_replicas, over.downscale_delay_s) == (0, 6, 5.0)
    for bad, message in (({"min_replicas": 3, "max_replicas": 2}, r"max_replicas: must be an integer in \[max\(1, "),
                         ({"max_replicas": 0}, "max_replicas"), ({"target_ongoing_requests": 0}, "> 0"),
                         ({"min_replicas": 1.5}, "an integer"), ({"upscale_delay": 3}, "unknown field"),
                         ({"max_replicas": 4, "initial_replicas": 9}, "initial_replicas"),
                         ({"min_replicas": True}, "an integer")):
        with pytest.raises(ConfigError, match=message):
            AutoscalingConfig.from_dict(bad)


def test_a_model_entry_takes_an_autoscaling_block_and_round_trips():
    entry = {"source": {"type": "fake", "tokens_per_second": 50}, "context_length": 64, "max_tokens_limit": 16,
             "sampling": {"max_new_tokens": 16},
             "autoscaling": {"min_replicas": 0, "max_replicas": 3, "downscale_delay_s": 20}}
    config = ModelConfig.from_dict("f", entry)
    assert config.autoscaling == AutoscalingConfig(0, 3, downscale_delay_s=20)
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="models.f.autoscaling.max_replicas"):
        ModelConfig.from_dict("f", {**entry, "autoscaling": {"max_replicas": 99}})
    fixed = {k: v for k, v in entry.items() if k != "autoscaling"}
    assert "autoscaling" not in ModelConfig.from_dict("g", fixed).to_dict()


class FakeController:
    """What the Autoscaler uses of the head's controller: deployments and autoscale_to."""

    def __init__(self, **deployments):
        self.deployments = deployments
        self.calls = []

    def autoscale_to(self, model, replicas):
        self.calls.append((model, replicas))
        self.deployments[model].replicas = replicas


def test_the_loop_samples_proxy_reports_applies_decisions_and_shows_them_in_status():
    from types import SimpleNamespace

    from gridserve.cli.render import autoscaling_table
    from gridserve.head.autoscaler import Autoscaler
    from gridserve.v1 import head_pb2

    t = [0.0]
    cfg = AutoscalingConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=1, upscale_delay_s=2,
                            downscale_delay_s=3, look_back_period_s=1)
    ctl = FakeController(m=SimpleNamespace(model="m", replicas=0, autoscaling=cfg),
                         fixed=SimpleNamespace(model="fixed", replicas=2, autoscaling=None))
    scaler = Autoscaler(ctl, clock=lambda: t[0])

    def report(proxy, ongoing, queued):
        scaler.on_report(head_pb2.LoadReport(proxy_id=proxy, models=[
            head_pb2.ModelLoad(model="m", ongoing=ongoing, queued=queued)]))

    scaler.tick()
    assert ctl.calls == []  # no proxy reports: no sample, no decision
    report("p1", 0, 1)  # a request held at zero: decided at once
    assert ctl.calls == [("m", 1)]
    for second in range(1, 5):  # two proxies, 3 requests in all, for 4 s: up to 3 after the 2 s delay
        t[0] = second
        report("p1", 1, 1)
        report("p2", 1, 0)
        scaler.tick()
    assert ctl.calls[-1] == ("m", 3)
    status = head_pb2.ClusterStatus(deployments=[head_pb2.DeploymentStatus(model="m", replicas=3, ready=3),
                                                 head_pb2.DeploymentStatus(model="fixed", replicas=2)])
    scaler.annotate(status)
    m, fixed = status.deployments
    assert m.autoscaling.last_decision == "1 -> 3: load 3.0 > 1 x 1 ongoing requests for 2s"
    assert (m.autoscaling.min_replicas, m.autoscaling.max_replicas, m.autoscaling.load) == (0, 4, 3)
    assert not fixed.HasField("autoscaling")
    table = autoscaling_table(status).splitlines()
    assert table[0].split() == ["MODEL", "CURRENT", "TARGET", "MIN", "MAX", "PER", "REPLICA", "LOAD", "DECIDED",
                                "LAST", "DECISION"]
    assert table[1].split()[:7] == ["m", "3", "3", "0", "4", "1", "3"] and len(table) == 2
    t[0] = 10  # the proxies went silent: no sample, the count stays
    scaler.tick()
    assert ctl.calls[-1] == ("m", 3)
