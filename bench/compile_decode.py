"""Eager vs inductor-compiled LlamaRunner decoding, back to back in one process: tokens/s, compile time, equality.

    python bench/compile_decode.py --random --threads 2 --cache /tmp/inductor   # SmolLM2-135M shapes, random weights
    python bench/compile_decode.py --threads 2                                   # the real smollm2, float32 weights

Run it twice with the same --cache to see the warm (on-disk cache) compile time.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from gridserve.common.request_contract import SamplingOptions
from gridserve.replica.llama_layers import EagerLayers, rope
from gridserve.replica.llama_runner import LlamaRunner

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward, written out so the compiler sees one function for every layer."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _qkv(x, ln, wq, wk, wv, cos, sin, eps: float, heads: int, kv_heads: int, head_dim: int):
    h = _rms_norm(x, ln, eps)
    q = F.linear(h, wq).view(-1, heads, head_dim)
    k = F.linear(h, wk).view(-1, kv_heads, head_dim)
    v = F.linear(h, wv).view(-1, kv_heads, head_dim)
    return rope(q, cos, sin), rope(k, cos, sin), v


def _finish(x, attn_out, wo, ln, wg, wu, wd, eps: float):
    x = x + F.linear(attn_out, wo)
    h = _rms_norm(x, ln, eps)
    return x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)


class CompiledLayers(EagerLayers):
    """The same computation as pure functions of (activations, weights), compiled once by inductor for
    every layer (weights are inputs, so 30 layers share one graph) with the token count dynamic.

    Attention over the slot cache stays eager. Until `ready` (set by `warm`) calls run eagerly."""

    def __init__(self, model, heads: int, kv_heads: int, head_dim: int, cache_dir: Path | None):
        super().__init__(model, heads, kv_heads, head_dim)
        norm = self.layers[0].input_layernorm
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.ready = False
        self.cache_dir = cache_dir
        self._qkv = torch.compile(_qkv, dynamic=True)
        self._finish = torch.compile(_finish, dynamic=True)

    def qkv(self, i, x, cos, sin):
        if not self.ready:
            return super().qkv(i, x, cos, sin)
        layer = self.layers[i]
        a = layer.self_attn
        return self._qkv(x, layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                         cos, sin, self.eps, self.heads, self.kv_heads, self.head_dim)

    def finish(self, i, x, attn_out):
        if not self.ready:
            return super().finish(i, x, attn_out)
        layer = self.layers[i]
        m = layer.mlp
        return self._finish(x, attn_out, layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
                            m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, self.eps)

    @torch.inference_mode()
    def warm(self, hidden: int, dtype: torch.dtype, device: torch.device) -> float:
        """Compile for one token and for many (size 1 is specialised); seconds taken. Then `ready`."""
        start = time.monotonic()
        if self.cache_dir is not None:
            use_compile_cache(self.cache_dir)
        saved, self.ready = self.ready, True
        try:
            for t in (1, 2, 7):
                x = torch.zeros(t, hidden, dtype=dtype, device=device)
                cos = torch.ones(t, 1, self.head_dim, dtype=dtype, device=device)
                sin = torch.zeros(t, 1, self.head_dim, dtype=dtype, device=device)  # not `cos`: aliasing is guarded on
                q, k, v = self.qkv(0, x, cos, sin)
                self.finish(0, x, q.reshape(t, -1))
        except BaseException:
            self.ready = saved
            raise
        return time.monotonic() - start


def use_compile_cache(directory: Path) -> None:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, compiled kernels) at `directory`, so a
    second run loads its compiled code instead of compiling again (inductor reads the variable when it
    first needs the cache, after this)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config
        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):
        pass


class Row(SimpleNamespace):
    """What the runner reads of a request, without a tokenizer."""

    @property
    def context_ids(self):
        return self.prompt_ids + self.output_ids


def model_and_prompts(args):
    if args.random:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).eval()
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 49152, (20 + 3 * i,), generator=gen).tolist() for i in range(16)]
        return model, prompts
    from gridserve.common.model_config import load_model_catalog
    from gridserve.replica.model_loader import load_model
    from gridserve.replica.settings import default_cache_dir
    import dataclasses  # float32 weights: the compiled functions take dense weight tensors, not GGUF blocks
    loaded = load_model(dataclasses.replace(load_model_catalog().get("smollm2"), quantization="none"), default_cache_dir())
    words = "fox owl bear deer wolf hare frog snail crow boar mole lynx elk bat wren toad".split()
    return loaded.model, [loaded.encode_prompt(f"Tell me a short story about a {w} in the forest.") for w in words]


def decode(runner: LlamaRunner, prompts, new: int) -> tuple[float, list[list[int]]]:
    """Greedy decode of all prompts together; decode tokens/s after the prefill step, and the outputs."""
    runner.reset()
    rows = [Row(prompt_ids=p, output_ids=[], opts=SamplingOptions(max_tokens=new), generator=None, slot=None,
                computed=0, cached_tokens=0, finished=False) for p in prompts]
    runner.add(rows)
    start, tokens = None, 0
    while any(len(r.output_ids) < new for r in rows):
        done, toks = runner.decode()
        for r, t in zip(done, toks):
            r.output_ids.append(t)
        if start is None:
            start = time.perf_counter()
        else:
            tokens += len(done)
    return tokens / (time.perf_counter() - start), [r.output_ids for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--random", action="store_true", help="SmolLM2-135M shapes with random weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--cache", default="/tmp/gridserve-inductor")
    p.add_argument("--rows", default="1,16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, prompts = model_and_prompts(args)
    eager = LlamaRunner(model, torch.device("cpu"), 16, 1024)
    comp = LlamaRunner(model, torch.device("cpu"), 16, 1024)
    comp.dense = CompiledLayers(model, comp.heads, comp.kv_heads, comp.head_dim, Path(args.cache))
    report = {"threads": args.threads, "load_start": os.getloadavg()[0]}
    report["compile_s"] = round(comp.dense.warm(model.config.hidden_size, torch.float32, torch.device("cpu")), 2)
    for n in [int(x) for x in args.rows.split(",")]:
        for rep in range(2):
            e_tps, e_out = decode(eager, prompts[:n], args.new)
            c_tps, c_out = decode(comp, prompts[:n], args.new)
            report[f"rows{n}_try{rep}"] = {"eager": round(e_tps, 1), "compiled": round(c_tps, 1),
                                            "equal": c_out == e_out}
        if n > 1:  # batched compiled == solo compiled, row by row
            solo = [decode(comp, [q], args.new)[1][0] for q in prompts[:4]]
            report[f"rows{n}_batched_equals_solo(4 rows)"] = solo == c_out[:4]
            report[f"rows{n}_rows_equal_to_eager"] = sum(a == b for a, b in zip(c_out, e_out))
    report["load_end"] = os.getloadavg()[0]
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
