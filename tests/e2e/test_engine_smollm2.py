"""The batching engine with the real SmolLM2 (as served): each greedy row equals its solo greedy decoding, token for token."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from gridserve.common.model_config import load_model_catalog
from gridserve.replica.settings import default_cache_dir
from gridserve.replica.engine import Engine
from gridserve.replica.kv_cache import KVBatch
from gridserve.replica.model_loader import load_model
from gridserve.common.request_contract import SamplingOptions


# (user message, max_tokens, joins once the first request has streamed this many tokens)
REQUESTS = [
    ("Tell me about the moon.", 40, 0),
    ("What is 2+2?", 8, 3),
    ("Write a short poem about autumn leaves falling slowly onto a quiet river at dusk, "
     "with the light fading and the water carrying them away.", 24, 6),
    ("Hi", 12, 10),
    ("List three colours.", 16, 16),
]
# Greedy outputs are asserted equal token for token. Batched rows see other matrix shapes than a
# solo run (padding, batch size), so their logits differ by float32 rounding: measured at most
# 5e-5 on logits up to ~32 in size. Exact equality holds unless two candidates are closer than
# that; the second test bounds the difference, with margin, so a real bug cannot hide in it.
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def smollm2():
    """smollm2 as served (float32 activations over its GGUF blocks, quantization "gguf"): a batched row's
    logits differ from solo ones by float32 rounding only (the block kernels sum each row alone, in one
    order, whatever the batch), so greedy rows are exactly solo's. Served bfloat16 would round
    each layer's output to 8 bits of mantissa, which differs with the batch's shape, so near-ties could
    flip; tests/e2e/test_quality_smollm2.py bounds what serving costs against float32 weights."""
    cfg = dataclasses.replace(load_model_catalog().get("smollm2"), dtype="float32")
    assert cfg.quantization == "gguf"
    return load_model(cfg, default_cache_dir())


@pytest.fixture(scope="module")
def prompts(smollm2):
    return [smollm2.encode_chat([("user", text)]) for text, _, _ in REQUESTS]


@pytest.fixture(scope="module")
def solo(smollm2, prompts):
    """Greedy decoding of each prompt alone, the whole sequence recomputed for every token by the model's
    own forward (no KV cache, no batch, none of the engine): an independent reference."""
    out = []
    with torch.inference_mode():
        for ids, (_, n, _) in zip(prompts, REQUESTS):
            seq = list(ids)
            while len(seq) - len(ids) < n and seq[-1] not in smollm2.eos_token_ids:
                seq.append(int(smollm2.model(torch.tensor([seq])).logits[0, -1].argmax()))
            out.append(seq[len(ids):])
    return out


async def collect(handle) -> list[int]:
    return [t async for out in handle.outputs() for t in out.token_ids]


async def test_staggered_greedy_rows_equal_solo_generate_while_one_is_cancelled(smollm2, prompts, solo):
    engine = Engine(smollm2, num_threads=torch.get_num_threads(), max_batch_size=8)
    engine.start()
    try:
        first = engine.submit("r0", prompts[0], SamplingOptions(max_tokens=REQUESTS[0][1]))
        doomed = engine.submit("doomed", prompts[2], SamplingOptions(max_tokens=200))
        tasks, got = {}, []
        async for out in first.outputs():
            got += out.token_ids
            for k, (_, n, join_at) in enumerate(REQUESTS[1:], start=1):
                if k not in tasks and len(got) >= join_at:
                    handle = engine.submit(f"r{k}", prompts[k], SamplingOptions(max_tokens=n))
                    tasks[k] = asyncio.create_task(collect(handle))
            if len(got) >= 5 and not doomed.done:
                doomed.cancel()  # leaves the batch at the next step; the others must not notice
        results = [got] + [await tasks[k] for k in sorted(tasks)]
        assert results == solo
        assert engine.stats().mean_batch_size > 1
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def smollm2_float32():
    """smollm2's dequantized float32 weights in transformers' own Llama (quantization "none"): what the
    generic runner's `KVBatch` serves."""
    cfg = dataclasses.replace(load_model_catalog().get("smollm2"), dtype="float32", quantization="none")
    return load_model(cfg, default_cache_dir())


@torch.inference_mode()
def test_batched_rows_logits_stay_within_tolerance_of_solo(smollm2_float32, prompts):
    model, rows = smollm2_float32.model, [list(p) for p in prompts[:3]]
    batch = KVBatch(model, smollm2_float32.device)
    logits = batch.prefill(rows)
    for _ in range(4):
        for row, seq in zip(logits, rows):
            alone = model(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(row, alone, atol=LOGITS_ATOL, rtol=0)
            seq.append(int(row.argmax()))
        logits = batch.decode([seq[-1] for seq in rows])


def test_a_cached_start_loads_without_transformers_llama_config_or_model_code(smollm2):
    """The blocks cache holds config, tokenizer and blocks; loading from it imports neither transformers'
    Auto classes, nor its Llama config and model, nor what those drag in (torch.distributed.tensor,
    sympy, torch._dynamo): about 1.5 s of a replica's start on a 2-core machine."""
    import json
    import subprocess
    import sys
    heavy = ["transformers.models.llama.configuration_llama", "transformers.models.llama.modeling_llama",
             "transformers.models.auto.modeling_auto", "torch.distributed.tensor", "sympy", "torch._dynamo"]
    code = ("import json, sys\n"
            "from gridserve.common.model_config import load_model_catalog\n"
            "from gridserve.replica.model_loader import load_model\n"
            "from gridserve.replica.settings import default_cache_dir\n"
            "lm = load_model(load_model_catalog().get('smollm2'), default_cache_dir())\n"
            "print(json.dumps({'from_cache': lm.from_cache, 'weights': lm.weights,\n"
            f"                  'heavy': [m for m in {heavy!r} if m in sys.modules]}}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["from_cache"] and got["weights"].startswith("gguf blocks")
    assert got["heavy"] == []
