"""The engine on a GPU: 1, 16 and 64 concurrent streams against offline static `generate` batches on the same card.

A model with SmolLM2-135M's shape and random weights is built locally in bfloat16 (or float16) on CUDA,
with the SmolLM2 tokenizer from a folder (no hub needed). Offline: `model.generate` on a static,
left-padded batch of B chat prompts, `min_new_tokens = max_new_tokens`, greedy. gridserve: the
replica's `Engine` (continuous batching, `LlamaRunner` slot cache) in its own thread, B requests
submitted at once, tokens counted as they reach the asyncio side. Both after one warm-up run.

    python bench/gpu_engine.py --tokenizer DIR [--dtype bfloat16] [--streams 1,16,64] [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True)
DEVICE = "cuda"
TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "the violin", "bees", "glass", "trains",
          "clouds", "copper", "owls", "tea", "maps", "salt", "kites"]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(tokenizer_dir: str, dtype: torch.dtype):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gridserve.common.model_config import load_model_catalog
    from gridserve.replica.model_loader import LoadedModel
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **SMOLLM2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype=dtype, device=DEVICE).eval()
    entry = load_model_catalog(REPO / "model_configs.json").models["smollm2"]
    config = dataclasses.replace(entry, max_batch_size=64, max_waiting=64, dtype=str(dtype).split(".")[-1],
                                 quantization="none", max_tokens_limit=1024)
    loaded = LoadedModel(config=config, model=model, tokenizer=tok, device=torch.device(DEVICE),
                         source="random weights, SmolLM2-135M shape", eos_token_ids=frozenset([tok.eos_token_id]))
    return loaded


def prompts(loaded, n: int) -> list[list[int]]:
    return [loaded.encode_chat([("user", f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} (#{i}).")])
            for i in range(n)]


@torch.inference_mode()
def offline(loaded, ids: list[list[int]], new: int) -> float:
    """tokens/s of one static greedy `generate` over the batch (left-padded)."""
    width = max(map(len, ids))
    pad = loaded.tokenizer.pad_token_id or 0
    x = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=DEVICE)
    sync()
    t = time.perf_counter()
    out = loaded.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=pad)
    sync()
    return (out.shape[0] * (out.shape[1] - width)) / (time.perf_counter() - t)


async def served(engine, ids: list[list[int]], new: int) -> dict:
    """B requests at once through the engine: tokens/s over the wave, TTFT p50/max."""
    from gridserve.common.request_contract import SamplingOptions
    t0 = time.perf_counter()
    firsts, counts = [], []

    async def one(i: int, p: list[int]) -> None:
        handle = engine.submit(f"r{i}", p, SamplingOptions(max_tokens=new))
        n = 0
        async for out in handle.outputs():
            if out.token_ids and not n:
                firsts.append(time.perf_counter() - t0)
            n += len(out.token_ids)
        counts.append(n)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(ids)))
    wall = time.perf_counter() - t0
    firsts.sort()
    return {"tokens": sum(counts), "tokens_per_s": sum(counts) / wall,
            "ttft_p50_s": firsts[len(firsts) // 2], "ttft_max_s": firsts[-1]}


async def main_async(a) -> dict:
    from gridserve.replica.engine import Engine
    dtype = getattr(torch, a.dtype)
    loaded = build(a.tokenizer, dtype)
    engine = Engine(loaded, num_threads=1, max_batch_size=64, max_waiting=64)
    engine.start()
    result = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "dtype": a.dtype,
              "new_tokens": a.new_tokens, "runner": type(engine.runner).__name__, "levels": []}
    try:
        await served(engine, prompts(loaded, 2), 8)  # warm-up: kernels, allocator
        offline(loaded, prompts(loaded, 2), 8)
        for b in [int(s) for s in a.streams.split(",")]:
            ids = prompts(loaded, b)
            off = offline(loaded, ids, a.new_tokens)
            srv = await served(engine, ids, a.new_tokens)
            row = {"streams": b, "offline_static_tokens_per_s": off, **srv,
                   "ratio": srv["tokens_per_s"] / off}
            result["levels"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        engine.stop()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True, help="a folder holding the SmolLM2 tokenizer (save_pretrained)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--streams", default="1,16,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default="")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a smoke run of the script itself
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    global DEVICE
    DEVICE = a.device
    result = asyncio.run(main_async(a))
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
