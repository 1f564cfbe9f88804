"""The proxy's Prometheus metrics (prometheus-client): requests, latency, tokens, streams, retries,
failovers; GET /metrics."""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FAILOVER_OUTCOMES = ("resumed", "failed")
UNKNOWN_MODEL = "unknown"  # the label of requests for a model that is not deployed (bounded cardinality)


class ProxyMetrics:
    """Every request metric, in a registry of their own (several proxies can live in one test process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        if registry is None:  # a registry of our own: add the process's CPU, memory and GC series
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                r.register(collector)
        self.requests = Counter("gridserve_requests", "Generation requests answered, by API, model and HTTP "
                                "status (499: the client went away)", ["api", "model", "status"], registry=r)
        self.ttft = Histogram("gridserve_time_to_first_token_seconds", "From the request to the replica's "
                              "first chunk", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("gridserve_inter_token_latency_seconds", "Time between generated tokens as "
                             "the proxy receives them", ["model"], buckets=ITL_BUCKETS, registry=r)
        self.tokens = Counter("gridserve_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("gridserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.streams = Gauge("gridserve_streams_in_flight", "Replica streams open now", ["model"], registry=r)
        self.retries = Counter("gridserve_upstream_retries", "Tries on another replica after a failure "
                               "before the first token", ["model"], registry=r)
        self.failovers = Counter("gridserve_failovers", "Mid-stream failovers: a stream whose replica went "
                                 "away after the first token, resumed on another replica (outcome=resumed) "
                                 "or ended with an error because none could continue (outcome=failed)",
                                 ["model", "outcome"], registry=r)
        self.stream_errors = Counter("gridserve_stream_errors", "Streams that failed after the first token",
                                     ["model"], registry=r)
        self.auth_failures = Counter("gridserve_auth_failures", "Requests refused for a missing or wrong API "
                                     "key", registry=r)
        self.rate_limited = Counter("gridserve_rate_limited", "Requests refused (429) by an API key's rate limit, "
                                    "by the limit reached (requests or tokens per minute)", ["limit"], registry=r)
        for kind in ("requests", "tokens"):
            self.rate_limited.labels(kind)

    def known_models(self, models) -> None:
        """Creates every per-model series at 0, so rates work before the first event (failovers included)."""
        for m in models:
            for metric in (self.tokens, self.prompt_tokens, self.streams, self.retries, self.stream_errors):
                metric.labels(m)
            for outcome in FAILOVER_OUTCOMES:
                self.failovers.labels(m, outcome)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of the registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
