"""The dashboard's history: rates from the proxy's counters, TTFT percentiles from histogram buckets, queue depth
and tokens/s from the replicas' Info, and a ring that never holds more than 15 minutes."""
from __future__ import annotations

import pytest

from gridserve.proxy.dashboard.history import History, quantile
from gridserve.proxy.request_metrics import ProxyMetrics
from gridserve.v1 import replica_pb2


def test_quantile_interpolates_within_the_bucket_like_prometheus():
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.5)
    assert quantile(0.25, buckets) == pytest.approx(0.3)
    assert quantile(0.99, buckets) == pytest.approx(0.99)


def test_quantile_is_none_without_observations_and_capped_in_the_inf_bucket():
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.99, [(1.0, 1.0), (float("inf"), 10.0)]) == 1.0


def test_samples_turn_counters_into_per_second_rates_by_model():
    m = ProxyMetrics()
    h = History(m, every_s=2.0)
    assert h.sample({}, now=100.0) is None  # the baseline
    for _ in range(6):
        m.requests.labels("chat", "smol", "200").inc()
    m.requests.labels("chat", "smol", "429").inc(2)
    m.requests.labels("chat", "smol", "503").inc()
    m.failovers.labels("smol", "resumed").inc()
    for ttft in (0.02, 0.03, 0.04, 2.0):
        m.ttft.labels("smol").observe(ttft)
    info = replica_pb2.InfoResponse(replica_id="r1", model="smol", waiting=3, tokens_per_second=41.5)
    s = h.sample({"r1": info}, now=102.0)
    assert s.requests_per_s == {"smol": 4.5}
    assert s.rate_limited_per_s == 1.0 and s.errors_per_s == 0.5 and s.failovers_per_s == 0.5
    assert s.queue_depth == {"smol": 3} and s.tokens_per_s == {"smol": 41.5}
    assert 25 <= s.ttft_p50_ms <= 50 and 1000 <= s.ttft_p99_ms <= 2500
    quiet = h.sample({}, now=104.0)
    assert quiet.requests_per_s == {"smol": 0.0} and quiet.tokens_per_s == {}
    assert quiet.ttft_p50_ms is not None  # still within the TTFT window of the last 10 s


def test_history_json_has_one_column_per_series_and_nulls_where_a_model_was_absent():
    m = ProxyMetrics()
    h = History(m, every_s=1.0)
    h.sample({}, now=0.0)
    h.sample({}, now=1.0)
    m.requests.labels("chat", "late", "200").inc()
    h.sample({}, now=2.0)
    j = h.to_json()
    assert j["t"] == [1.0, 2.0] and j["models"] == ["late"]
    assert j["requests_per_s"]["late"] == [None, 1.0]
    assert j["ttft_p50_ms"] == [None, None] and len(j["failovers_per_s"]) == 2


def test_history_keeps_only_the_window():
    h = History(ProxyMetrics(), every_s=2.0, window_s=60.0)
    for i in range(200):
        h.sample({}, now=float(i * 2))
    assert len(h.samples) == 30 and h.samples[0].t == 340.0
    assert not h.due(now=398.5) and h.due(now=400.0)
