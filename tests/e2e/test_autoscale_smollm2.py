"""Scale to zero with the real SmolLM2: deployed at zero, the first OpenAI request starts a replica and is
answered; idle, the deployment goes back to zero."""
from __future__ import annotations

import json
import time

import openai
import pytest

from support.cluster import Cluster, http
from support.waiting import wait_for
from gridserve.common.model_config import DEFAULT_MODEL_CONFIGS

pytestmark = pytest.mark.timeout(400)

MODEL = "smollm2"


def test_smollm2_scales_from_zero_for_a_request_and_back_to_zero_when_idle(tmp_path):
    with Cluster(tmp_path, DEFAULT_MODEL_CONFIGS) as c:
        c.start_head()
        c.start_scheduler("n1", num_cpus=2)
        out = c.cli("deploy", MODEL, "--min-replicas", "0", "--max-replicas", "1", "--downscale-delay", "5",
                    "--look-back-period", "1").stdout
        assert "with 0 replica(s) (autoscaled: 0..1)" in out
        status, _, body = http("GET", c.url("/ready"))
        assert status == 200 and json.loads(b"".join(body))["scaled_to_zero"] == [MODEL]
        started = time.monotonic()
        # A cold start can outlast the proxy's 60 s hold on a busy machine: the client then gets 503 with
        # Retry-After and tries again, as the openai package does by itself.
        with openai.OpenAI(base_url=c.url("/v1"), api_key="none", max_retries=6, timeout=120) as client:
            done = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=16, temperature=0)
        first_s = time.monotonic() - started
        assert "Paris" in done.choices[0].message.content
        stopped = time.monotonic()
        wait_for(lambda: not c.replicas(MODEL) and c.status().deployments[0].replicas == 0, 120,
                 "the idle deployment back at zero")
        print(f"\nSmolLM2 from zero: answer after {first_s:.1f}s; back at zero {time.monotonic() - stopped:.1f}s "
              f"after it")
        decision = c.status().deployments[0].autoscaling.last_decision
        assert decision.startswith("1 -> 0: "), decision
