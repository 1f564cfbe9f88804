"""Quality gate: smollm2 as served (its configured dtype and quantization, the serving runner) against float32 weights."""
from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from gridserve.common.model_config import load_model_catalog
from gridserve.replica.engine import Engine
from gridserve.replica.model_loader import load_model
from gridserve.common.request_contract import SamplingOptions
from gridserve.replica.settings import default_cache_dir

TEXT = Path(__file__).resolve().parents[1] / "data" / "english.txt"
ANSWER_TOKENS = 24
FACTS = ["What is the capital of France?", "What is the capital of Japan?", "How many legs does a spider have?",
         "What is the largest planet in the solar system?", "Who wrote Romeo and Juliet?",
         "What is the boiling point of water in Celsius?", "What gas do plants take in from the air?",
         "How many days are there in a week?", "What is the chemical symbol for gold?",
         "Which ocean is the largest?", "What is the closest star to the Earth?", "How many continents are there?",
         "What language is spoken in Brazil?", "What is the freezing point of water in Fahrenheit?",
         "Who painted the Mona Lisa?", "What is the square root of 81?", "Which animal is known as the king of the jungle?",
         "What is the longest river in Africa?", "How many sides does a hexagon have?",
         "What do bees make?", "What is the capital of Italy?", "What color is the sky on a clear day?"]


@pytest.fixture(scope="module")
def served():
    return load_model(load_model_catalog().get("smollm2"), default_cache_dir())


@pytest.fixture(scope="module")
def fp32():
    cfg = dataclasses.replace(load_model_catalog().get("smollm2"), dtype="float32", quantization="none")
    return load_model(cfg, default_cache_dir())


@torch.inference_mode()
def test_served_perplexity_on_english_text_is_within_one_percent_of_float32(served, fp32):
    ids = fp32.encode_prompt(TEXT.read_text())
    assert 900 < len(ids) < 2048
    logits = fp32.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    ref = math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))
    runner = served.make_runner(1)
    got = math.exp(runner.score(ids))
    print(f"perplexity: served ({served.weights}) {got:.3f}, float32 {ref:.3f}")
    assert abs(got - ref) / ref <= 0.01


async def test_served_greedy_answers_to_factual_prompts_equal_float32_ones(served, fp32):
    prompts = [fp32.encode_chat([("user", q)]) for q in FACTS]
    width = max(len(p) for p in prompts)  # one left-padded float32 batch: solo's tokens, 22 times faster
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = fp32.model.generate(ids, attention_mask=mask, max_new_tokens=ANSWER_TOKENS, do_sample=False)
    eos = fp32.eos_token_ids
    ref = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        ref.append(row[:end])
    engine = Engine(served, num_threads=torch.get_num_threads(), max_batch_size=len(prompts))
    engine.start()
    try:
        async def answer(i, p):
            return [t async for o in engine.submit(f"q{i}", p, SamplingOptions(max_tokens=ANSWER_TOKENS)).outputs()
                    for t in o.token_ids]
        got = await asyncio.gather(*(answer(i, p) for i, p in enumerate(prompts)))
    finally:
        engine.stop()
    same = sum(g == r for g, r in zip(got, ref))
    print(f"greedy answers equal to float32: {same} of {len(FACTS)}")
    for question, g, r in zip(FACTS, got, ref):
        if g != r:
            print(f"  differs: {question!r}\n    served:  {served.tokenizer.decode(g)!r}\n"
                  f"    float32: {fp32.tokenizer.decode(r)!r}")
    assert len(FACTS) >= 20 and same >= 18
