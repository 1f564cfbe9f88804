"""The dashboard's charts data: a bounded ring of samples (the last 15 minutes) taken from the proxy's own
counters and the replicas' last reported Info, turned into per-second rates and TTFT percentiles."""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from gridserve.proxy.request_metrics import ProxyMetrics
from gridserve.v1 import replica_pb2

WINDOW_S = 15 * 60
SAMPLE_EVERY_S = 2.0
TTFT_WINDOW_S = 10.0  # TTFT percentiles are over the requests of the last few seconds, not of one sample


def counter_by(counter: Counter, label: str, where=lambda labels: True) -> dict[str, float]:
    """A counter's totals summed by one label (only the series whose labels pass `where`)."""
    out: dict[str, float] = {}
    for family in counter.collect():
        for s in family.samples:
            if s.name.endswith("_total") and where(s.labels):
                out[s.labels.get(label, "")] = out.get(s.labels.get(label, ""), 0.0) + s.value
    return out


def histogram_buckets(hist: Histogram) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) of a histogram, summed over all its label sets, by bound."""
    sums: dict[float, float] = {}
    for family in hist.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                sums[le] = sums.get(le, 0.0) + s.value
    return sorted(sums.items())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket the rank falls in; None with no observation.
    A rank in the +Inf bucket gives the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def bucket_delta(now: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    old = dict(before)
    return [(le, count - old.get(le, 0.0)) for le, count in now]


@dataclass
class Totals:
    """The cumulative counters at one instant, to take differences of."""
    at: float
    requests: dict[str, float]
    tokens: dict[str, float]
    rate_limited: float
    errors: float
    failovers: float
    ttft: list[tuple[float, float]]


def read_totals(metrics: ProxyMetrics, at: float) -> Totals:
    status = lambda labels: labels.get("status", "")  # noqa: E731
    errors = sum(counter_by(metrics.requests, "model", lambda l: status(l).startswith("5")).values())
    errors += sum(counter_by(metrics.stream_errors, "model").values())
    return Totals(at=at, requests=counter_by(metrics.requests, "model"), tokens=counter_by(metrics.tokens, "model"),
                  rate_limited=sum(counter_by(metrics.requests, "model", lambda l: status(l) == "429").values()),
                  errors=errors, failovers=sum(counter_by(metrics.failovers, "model").values()),
                  ttft=histogram_buckets(metrics.ttft))


@dataclass
class Sample:
    t: float
    tokens_per_s: dict[str, float]        # by model: what its replicas report generating
    requests_per_s: dict[str, float]      # by model: requests the proxy answered
    queue_depth: dict[str, float]         # by model: requests waiting for a batch row
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    rate_limited_per_s: float             # 429 answers
    errors_per_s: float                   # 5xx answers and streams failed after the first token
    failovers_per_s: float


def _rate(now: float, before: float, dt: float) -> float:
    return round(max(0.0, now - before) / dt, 3) if dt > 0 else 0.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


@dataclass
class History:
    """Samples of the last `window_s` seconds, one every `every_s`; memory is bounded by the deque's maxlen."""
    metrics: ProxyMetrics
    every_s: float = SAMPLE_EVERY_S
    window_s: float = WINDOW_S
    samples: deque = field(init=False)
    _totals: deque = field(init=False)  # the last TTFT_WINDOW_S of totals, for differences

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=max(1, int(self.window_s / self.every_s)))
        self._totals = deque(maxlen=max(2, int(TTFT_WINDOW_S / self.every_s) + 1))

    def due(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return not self._totals or now - self._totals[-1].at >= self.every_s * 0.95

    def sample(self, infos: dict[str, replica_pb2.InfoResponse], now: float | None = None) -> Sample | None:
        """Takes a sample now from the counters and the replicas' Info; the first one only sets the baseline."""
        now = time.time() if now is None else now
        cur = read_totals(self.metrics, now)
        prev, oldest = (self._totals[-1], self._totals[0]) if self._totals else (None, None)
        self._totals.append(cur)
        if prev is None:
            return None
        dt = cur.at - prev.at
        ttft = bucket_delta(cur.ttft, oldest.ttft)
        tokens: dict[str, float] = {}
        queue: dict[str, float] = {}
        for info in infos.values():
            tokens[info.model] = round(tokens.get(info.model, 0.0) + info.tokens_per_second, 2)
            queue[info.model] = queue.get(info.model, 0) + info.waiting
        s = Sample(t=round(now, 3), tokens_per_s=tokens,
                   requests_per_s={m: _rate(v, prev.requests.get(m, 0.0), dt) for m, v in cur.requests.items()},
                   queue_depth=queue, ttft_p50_ms=_ms(quantile(0.5, ttft)), ttft_p99_ms=_ms(quantile(0.99, ttft)),
                   rate_limited_per_s=_rate(cur.rate_limited, prev.rate_limited, dt),
                   errors_per_s=_rate(cur.errors, prev.errors, dt),
                   failovers_per_s=_rate(cur.failovers, prev.failovers, dt))
        self.samples.append(s)
        return s

    def to_json(self) -> dict:
        """Column arrays for the charts: one value per sample, null where a model had no value then."""
        samples = list(self.samples)
        models = sorted({m for s in samples for m in (*s.tokens_per_s, *s.requests_per_s, *s.queue_depth)})

        def per_model(attr: str) -> dict[str, list]:
            return {m: [getattr(s, attr).get(m) for s in samples] for m in models}

        return {"interval_s": self.every_s, "window_s": self.window_s, "t": [s.t for s in samples],
                "models": models, "tokens_per_s": per_model("tokens_per_s"),
                "requests_per_s": per_model("requests_per_s"), "queue_depth": per_model("queue_depth"),
                "ttft_p50_ms": [s.ttft_p50_ms for s in samples], "ttft_p99_ms": [s.ttft_p99_ms for s in samples],
                "rate_limited_per_s": [s.rate_limited_per_s for s in samples],
                "errors_per_s": [s.errors_per_s for s in samples],
                "failovers_per_s": [s.failovers_per_s for s in samples]}
