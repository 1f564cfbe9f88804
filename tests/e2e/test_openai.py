"""The OpenAI-compatible API of a real cluster serving the real SmolLM2, driven with the `openai` package and
`curl -N`, behind an API key; request ids in the proxy's and the replica's logs; /metrics after it all."""
from __future__ import annotations

import json
import os
import subprocess
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.cluster import Cluster, http
from support.waiting import wait_for
from gridserve.common.model_config import DEFAULT_MODEL_CONFIGS

pytestmark = pytest.mark.timeout(300)

KEY = "sk-e2e-openai-key-0001"
MODEL = "smollm2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (with its proxy) and one scheduler, SmolLM2 deployed and READY, loaded once for the module."""
    root = tmp_path_factory.mktemp("openai")
    (root / "keys").write_text(f"{KEY}\n")
    c = Cluster(root, DEFAULT_MODEL_CONFIGS)
    started = time.monotonic()
    with c:
        c.start_head(["--api-key-file", str(root / "keys"), "--log-level", "INFO"])
        c.start_scheduler("n1", num_cpus=2)
        c.cli("deploy", MODEL)
        c.wait_ready(MODEL, 1, timeout=240)
        print(f"SmolLM2 READY after {time.monotonic() - started:.1f}s")
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    with openai.OpenAI(base_url=cluster.url("/v1"), api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def test_chat_completion_without_streaming_answers_paris_with_usage(client):
    done = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=32, temperature=0,
                                          extra_headers={"X-Request-Id": "e2e-chat-1"})
    assert done.id == "chatcmpl-e2e-chat-1" and done.object == "chat.completion" and done.model == MODEL
    assert "Paris" in done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 5 and 0 < done.usage.completion_tokens <= 32
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_chat_completion_streams_role_deltas_finish_and_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0,
                                            seed=1, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 5 and "Paris" in "".join(texts)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 24


def test_text_completion_streaming_and_not_stops_at_max_tokens(client):
    whole = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 6 and whole.choices[0].text.strip()
    pieces = list(client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_errors_reach_the_client_as_openai_exceptions(cluster, client):
    with pytest.raises(openai.NotFoundError, match="not deployed"):
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model=MODEL, messages=FRANCE, n=2)
    with pytest.raises(openai.BadRequestError, match="context") as exc:
        client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=4)
    assert exc.value.status_code == 400
    with openai.OpenAI(base_url=cluster.url("/v1"), api_key="sk-wrong-key", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_curl_streams_sse_in_pieces_ending_with_done(cluster):
    story = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    # 48 tokens take seconds to generate, so pieces arriving as generated show as several reads
    body = json.dumps({"model": MODEL, "messages": story, "max_tokens": 48, "temperature": 0, "stream": True})
    proc = subprocess.Popen(["curl", "-sS", "-N", cluster.url("/v1/chat/completions"), "-H",
                             f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", "-d", body],
                            stdout=subprocess.PIPE)
    pieces = []
    while piece := os.read(proc.stdout.fileno(), 65536):
        pieces.append(piece)
    assert proc.wait(60) == 0
    events = [e for e in b"".join(pieces).decode().split("\n\n") if e]
    assert len(pieces) >= 5, pieces  # arrived as generated, not at the end
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_request_id_is_in_the_proxy_and_replica_log_lines(cluster, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, extra_headers={"X-Request-Id": "e2e-rid-42"})
    replica = cluster.replicas(MODEL)[0].replica_id
    replica_log = cluster.root / "n1" / "logs" / f"{replica}.log"
    wait_for(lambda: "request_id=e2e-rid-42" in replica_log.read_text(), 10, "the id in the replica's log")
    proxy_lines = [ln for ln in (cluster.root / "head.log").read_text().splitlines() if "request_id=e2e-rid-42" in ln]
    assert any(" proxy " in ln and " request_done " in ln and "api=completions" in ln for ln in proxy_lines)
    logs = cluster.cli("logs", replica).stdout
    assert "request_id=e2e-rid-42" in logs


def test_metrics_count_the_requests_tokens_and_show_the_ready_replica(cluster):
    def scrape() -> dict:
        status, _, body = http("GET", cluster.url("/metrics"))
        assert status == 200
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(b"".join(body).decode()) for s in f.samples}

    def ready_gauge(samples):
        return samples.get(("gridserve_cluster_replicas", frozenset({("model", MODEL), ("state", "READY")})))

    samples = wait_for(lambda: (lambda s: s if ready_gauge(s) == 1 else None)(scrape()), 15, "the cluster gauges")
    ok = samples[("gridserve_requests_total", frozenset({("api", "chat.completions"), ("model", MODEL),
                                                         ("status", "200")}))]
    assert ok >= 2
    assert samples[("gridserve_requests_total", frozenset({("api", "chat.completions"), ("model", "unknown"),
                                                           ("status", "404")}))] >= 1
    assert samples[("gridserve_generated_tokens_total", frozenset({("model", MODEL)}))] > 30
    assert samples[("gridserve_time_to_first_token_seconds_count", frozenset({("model", MODEL)}))] >= 5
    assert samples[("gridserve_auth_failures_total", frozenset())] >= 1
    assert samples[("gridserve_cluster_nodes", frozenset({("alive", "true")}))] == 1
    replica = cluster.replicas(MODEL)[0].replica_id
    assert samples[("gridserve_replica_queue_depth", frozenset({("model", MODEL), ("replica", replica)}))] == 0
