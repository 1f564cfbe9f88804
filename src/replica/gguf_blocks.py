"""Serves a GGUF model's block-quantized weights as they are (Q4_1, Q8_0), with float32 activations, on CPU."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from gridserve.common.errors import ModelLoadError
from gridserve.common.eventlog import event

log = logging.getLogger("gridserve.replica.gguf_blocks")
SOURCE = Path(__file__).with_name("gguf_blocks.cpp")
QK = 32  # weights per block
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # per 32 weights: fp16 d (and fp16 m for Q4_1), then the quants
# GGUF tensor name (blk.{i}.X.weight) -> the module of transformers' Llama layer i.
LLAMA_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
# Products made as one (one pass of the threads where there were several): the parts read slices of them.
JOINED = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_gate_up": ("ffn_gate", "ffn_up")}
_P, _I = ctypes.c_void_p, ctypes.c_int64
# The KV cache the kernels keep: float16 halves float32's memory at the same perplexity (the quality
# gate and its numbers: docs/performance.md), as llama.cpp's float16 default does.
KV_DTYPE = torch.float16
# No contraction of a * b + c into one FMA where the source does not ask for it: RoPE and the residual
# adds round as torch's separate operations do.
CXXFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


class Kernels:
    """The compiled kernels (`gguf_blocks.cpp`), built once per CPU and source into `directory`."""

    kv_dtype = KV_DTYPE  # the KV cache they read and write

    def __init__(self, directory: Path):
        self.path = _build(directory)
        lib = ctypes.CDLL(str(self.path))  # ctypes drops the GIL during each call
        lib.gs_q4_1_matmul.argtypes = [_P, _I, _I, _P, _P, _P, _I, _P]
        lib.gs_q8_0_matmul.argtypes = [_P, _I, _I, _P, _P, _I, _P]
        lib.gs_decode_attention.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P]
        lib.gs_rms_norm.argtypes = [_P, _P, _P, _I, _I, ctypes.c_float, _P]
        lib.gs_rope_kv.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P]
        lib.gs_silu_mul.argtypes = [_P, _I, _I, _P]
        for f in (lib.gs_q4_1_matmul, lib.gs_q8_0_matmul, lib.gs_decode_attention, lib.gs_rms_norm,
                  lib.gs_rope_kv, lib.gs_silu_mul):
            f.restype = None
        self.lib = lib
        # Prompt tokens' products on AMX, where the CPU has it and Linux grants the tile state.
        self.amx = cpu_has_amx() and lib.gs_amx_init() == 1
        if self.amx:
            lib.gs_q4_1_matmul_amx.argtypes = [_P, _I, _I, _P, _P, _P, _I, _P]
            lib.gs_q8_0_matmul_amx.argtypes = [_P, _I, _I, _P, _P, _I, _P]
            lib.gs_q4_1_matmul_amx.restype = lib.gs_q8_0_matmul_amx.restype = None

    def product(self, w: "BlockWeight", x: torch.Tensor, y: torch.Tensor, amx: bool = False) -> None:
        """y [M, w.n] = x [M, w.k] . W^T, both contiguous float32; on AMX (self.amx only) with `amx`."""
        lib, m = self.lib, x.shape[0]
        if w.kind == "Q4_1":
            f = lib.gs_q4_1_matmul_amx if amx else lib.gs_q4_1_matmul
            f(x.data_ptr(), m, w.k, w.qs.data_ptr(), w.d.data_ptr(), w.m.data_ptr(), w.n, y.data_ptr())
        else:
            f = lib.gs_q8_0_matmul_amx if amx else lib.gs_q8_0_matmul
            f(x.data_ptr(), m, w.k, w.qs.data_ptr(), w.d.data_ptr(), w.n, y.data_ptr())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, add: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """RMSNorm of each row of a float32 x [..., D] with `weight` [D] (LlamaRMSNorm's math). With `add`
        (x's shape), x += add in place first: a residual and the norm after it in one call."""
        if add is not None and not (x.is_contiguous() and add.is_contiguous() and add.shape == x.shape):
            x.add_(add)
            add = None
        x = x.contiguous()
        out = torch.empty_like(x)
        self.lib.gs_rms_norm(x.data_ptr(), add.data_ptr() if add is not None else None, weight.data_ptr(),
                             x.numel() // x.shape[-1], x.shape[-1], eps, out.data_ptr())
        return out

    def rope_kv(self, qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """From the joined product qkv [T, (heads + 2 kv_heads) * D]: the queries [T, heads, D] with RoPE
        (cos, sin [T, D]); the keys (RoPE'd) and values rounded to float16 and written into the caches
        (float16, contiguous, viewed as rows of D) at rows[t * kv_heads + h], int64 (the caller makes
        them from slots and positions)."""
        _check_kv(k_cache, v_cache)
        T, dim = qkv.shape[0], cos.shape[-1]
        q = torch.empty(T, heads, dim)
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        self.lib.gs_rope_kv(qkv.data_ptr(), T, heads, kv_heads, dim, cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                            k_cache.data_ptr(), v_cache.data_ptr(), rows.data_ptr())
        return q

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up from the joined product gate_up [T, 2F] (gate first): [T, F], float32."""
        gate_up = gate_up.contiguous()
        T, F = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(T, F)
        self.lib.gs_silu_mul(gate_up.data_ptr(), T, F, out.data_ptr())
        return out

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                         lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one query token per row, q [n, kv_heads, group, D], over row r's first
        lengths[r] positions of cache slot slots[r] (k, v [slots, kv_heads, max_len, D], float16)."""
        _check_kv(k, v)
        n, kv_heads, group, dim = q.shape
        q = q.contiguous()
        out = torch.empty_like(q)
        self.lib.gs_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), slots.data_ptr(), lengths.data_ptr(),
                                     n, kv_heads, group, dim, k.shape[2], scale, out.data_ptr())
        return out


def _check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    """The kernels read and write the KV cache as contiguous float16 (KV_DTYPE)."""
    if not all(t.dtype == KV_DTYPE and t.is_contiguous() for t in (k, v)):
        raise TypeError(f"the KV cache kernels need contiguous {KV_DTYPE} caches, got {k.dtype} and {v.dtype}")


def _cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo ("" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith("flags")), "")


def cpu_has_avx512() -> bool:
    return "avx512f" in _cpu_flags().split()


def cpu_has_amx() -> bool:
    """AMX tiles with bfloat16 products (Intel Sapphire Rapids and later)."""
    flags = _cpu_flags().split()
    return all(f in flags for f in ("amx_tile", "amx_bf16", "avx512_bf16"))


def _build(directory: Path) -> Path:
    """g++ CXXFLAGS into directory/gguf_blocks-<hash of source, flags and CPU flags>.so, once."""
    flags = _cpu_flags()
    if "avx512f" not in flags.split():
        raise ModelLoadError("the gguf block kernels need a CPU with AVX-512 (avx512f)")
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CXXFLAGS).encode() + flags.encode()).hexdigest()[:16]
    target = directory / f"gguf_blocks-{key}.so"
    if target.is_file():
        return target
    if cxx is None:
        raise ModelLoadError("the gguf block kernels need a C++ compiler (g++) to build once; none is installed")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    cmd = [cxx, *CXXFLAGS, "-o", str(tmp), str(SOURCE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise ModelLoadError(f"building the gguf block kernels failed: {done.stderr.strip()[-300:]}")
        os.replace(tmp, target)  # atomic: replicas building at once each install a whole file
    finally:
        tmp.unlink(missing_ok=True)
    event(log, "kernels_built", path=target)
    return target


class BlockWeight:
    """One GGUF tensor's blocks, split into arrays the kernels read: quants [N, K/32, 16 or 32] and the
    per-block scale d (and minimum m for Q4_1), fp16 as in the file."""

    def __init__(self, kind: str, raw: np.ndarray, n: int, k: int):
        self.kind, self.n, self.k = kind, n, k
        self.part_of: tuple[str, int] | None = None  # (joined weight, first row) when a slice of one
        blocks = raw.reshape(n, k // QK, BLOCK_BYTES[kind])
        self.d = _fp16(blocks[..., 0:2], n, k)
        if kind == "Q4_1":
            self.m = _fp16(blocks[..., 2:4], n, k)
            self.qs = torch.from_numpy(np.ascontiguousarray(blocks[..., 4:]))
        else:
            self.m = None
            self.qs = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8))

    @classmethod
    def joined(cls, parts: list["BlockWeight"], name: str) -> "BlockWeight":
        """One weight, called `name`, whose rows are the parts' rows in order; each part then reads its
        slice of it (no second copy), so one product serves them all with the same results per row."""
        kind, k = parts[0].kind, parts[0].k
        whole = cls.__new__(cls)
        whole.kind, whole.k, whole.n, whole.part_of = kind, k, sum(p.n for p in parts), None
        whole.qs = torch.cat([p.qs for p in parts])
        whole.d = torch.cat([p.d for p in parts])
        whole.m = torch.cat([p.m for p in parts]) if kind == "Q4_1" else None
        at = 0
        for p in parts:
            p.view_of(whole, name, at)
            at += p.n
        return whole

    def view_of(self, whole: "BlockWeight", name: str, at: int) -> None:
        """Read rows at..at+n of `whole` (called `name`) instead of arrays of its own."""
        self.part_of = (name, at)
        self.qs, self.d = whole.qs[at:at + self.n], whole.d[at:at + self.n]
        self.m = whole.m[at:at + self.n] if whole.m is not None else None

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the float32 weight (an embedding lookup)."""
        q = self.qs[ids]
        if self.m is not None:  # weight j of a block is the low nibble of byte j, weight j + 16 the high one
            q = torch.cat((q & 15, q >> 4), dim=-1)
        q = q.reshape(len(ids), self.k).float()
        scale = self.d[ids].float().repeat_interleave(QK, dim=1)
        if self.m is None:
            return q * scale
        return torch.addcmul(self.m[ids].float().repeat_interleave(QK, dim=1), q, scale)


def _fp16(part: np.ndarray, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(part).view(np.float16).reshape(n, k // QK))


class PromptRows:
    """Which rows of a step's flattened tokens are prompt tokens. Their products run on AMX where the
    kernels have it (float32 split into two bfloat16 parts: about 2^-16 from float32, 2-3x faster
    from a few dozen rows on); generated tokens (decoding, a resumed stream's replayed tokens) and
    the head always take the float32 kernel, which is faster at a few rows. Each kind's result for a
    row never depends on the rows beside it, and a replayed token's keys and values are exactly
    those its first replica decoded."""

    def __init__(self, mask: list[bool]):
        self.all, self.none = all(mask), not any(mask)
        if not (self.all or self.none):
            m = torch.tensor(mask)
            self.prompt, self.other = m.nonzero().flatten(), (~m).nonzero().flatten()


class BlockLinear(torch.nn.Module):
    """A bias-free nn.Linear whose weight stays in its GGUF blocks: y = x W^T in float32."""

    def __init__(self, weight: BlockWeight, kernels: Kernels):
        super().__init__()
        self.w, self.kernels = weight, kernels
        self.in_features, self.out_features = weight.k, weight.n

    def forward(self, x: torch.Tensor, rows: PromptRows | None = None) -> torch.Tensor:
        """`rows`: which rows are prompt tokens (PromptRows; None: none of them)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.dtype != torch.float32:
            raise TypeError(f"gguf block weights take float32 activations, not {x.dtype}")
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.out_features)
        if rows is None or rows.none or not self.kernels.amx:
            self.kernels.product(self.w, x, y)
        elif rows.all:
            self.kernels.product(self.w, x, y, amx=True)
        else:
            for index, amx in ((rows.prompt, True), (rows.other, False)):
                part = torch.empty(len(index), self.out_features)
                self.kernels.product(self.w, x.index_select(0, index), part, amx=amx)
                y.index_copy_(0, index, part)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.w.kind}"


class BlockEmbedding(torch.nn.Module):
    """nn.Embedding over the same blocks (a tied embedding and head share one copy)."""

    def __init__(self, weight: BlockWeight):
        super().__init__()
        self.w = weight
        self.num_embeddings, self.embedding_dim = weight.n, weight.k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)


def _llama_row_order(rows: int, heads: int) -> np.ndarray:
    """GGUF row index of each transformers row of attn_q / attn_k: llama.cpp's converter interleaves
    the two halves of each head's rotary dimensions; transformers' loader undoes it the same way."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(2, 1).reshape(rows)


def read_blocks(cfg, gguf: Path) -> dict[str, "BlockWeight | torch.Tensor"]:
    """The GGUF's Q4_1/Q8_0 tensors by name (attn_q/attn_k rows in transformers' order, q/k/v and
    gate/up also joined) and its float32 ones (norms) as tensors. gguf's reader takes ~2 s here (it
    parses the tokenizer metadata too), so the loader caches the result (save_packed/load_packed).
    `cfg` is the model's transformers config."""
    from gguf import GGUFReader
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    blocks = {}
    for t in GGUFReader(str(gguf)).tensors:
        if t.tensor_type.name == "F32":
            blocks[t.name] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(tuple(reversed(
                [int(d) for d in t.shape]))))
            continue
        if t.tensor_type.name not in BLOCK_BYTES:
            raise ModelLoadError(f"gguf tensor {t.name} is {t.tensor_type.name}; the block kernels take "
                                 f"{' and '.join(BLOCK_BYTES)}")
        n, k = int(t.shape[1]), int(t.shape[0])
        raw = np.asarray(t.data).reshape(n, -1)
        short = t.name.split(".")[-2]
        if short in heads and t.name.startswith("blk."):
            raw = raw[_llama_row_order(n, heads[short])]
        blocks[t.name] = BlockWeight(t.tensor_type.name, raw, n, k)
    for i in range(cfg.num_hidden_layers):
        for joined, parts in JOINED.items():
            names = [f"blk.{i}.{p}.weight" for p in parts]
            found = [blocks.get(n) for n in names]
            if all(found) and len({(w.kind, w.k) for w in found}) == 1:
                name = f"blk.{i}.{joined}.weight"
                blocks[name] = BlockWeight.joined(found, name)
    return blocks


def save_packed(blocks: dict, path: Path) -> None:
    """One safetensors file: each weight's arrays (a part of a joined weight only names its rows there),
    its kind and shape in the metadata; float32 tensors as they are."""
    from safetensors.torch import save_file
    tensors, specs = {}, {}
    for name, w in blocks.items():
        if isinstance(w, torch.Tensor):
            tensors[name], specs[name] = w.contiguous(), "F32"
            continue
        spec = f"{w.kind} {w.n} {w.k}"
        if w.part_of is not None:
            specs[name] = f"{spec} {w.part_of[0]} {w.part_of[1]}"
            continue
        specs[name] = spec
        tensors[f"{name}.qs"], tensors[f"{name}.d"] = w.qs, w.d
        if w.m is not None:
            tensors[f"{name}.m"] = w.m
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=specs)


def load_packed(path: Path) -> dict:
    """What save_packed wrote; the arrays stay in the file's mapping (page cache, shared by the node's
    replicas of the model) instead of being copied."""
    from safetensors import safe_open
    blocks, parts = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for name, spec in f.metadata().items():
            if spec == "F32":
                blocks[name] = f.get_tensor(name)
                continue
            kind, n, k, *part = spec.split()
            w = BlockWeight.__new__(BlockWeight)
            w.kind, w.n, w.k, w.part_of = kind, int(n), int(k), None
            if part:
                parts[name] = (w, part[0], int(part[1]))
            else:
                w.qs, w.d = f.get_tensor(f"{name}.qs"), f.get_tensor(f"{name}.d")
                w.m = f.get_tensor(f"{name}.m") if kind == "Q4_1" else None
            blocks[name] = w
    for w, whole, at in parts.values():
        w.view_of(blocks[whole], whole, at)
    return blocks


NORMS = ("attn_norm", "ffn_norm")  # each layer's input_layernorm and post_attention_layernorm


def build_model(cfg, blocks: dict, kernels: Kernels):
    """A Llama for `cfg` (a `llama_shell.LlamaShellConfig`, or a transformers config) whose linear
    layers, embedding and head are the GGUF blocks and whose norms are the GGUF's float32 ones: plain
    torch modules (`llama_shell`), no transformers model code. ModelLoadError if the file holds a
    tensor this does not place, or lacks one the model needs."""
    from gridserve.replica.llama_shell import LlamaShell, LlamaShellConfig
    cfg = LlamaShellConfig.of(cfg)
    placed: set[str] = set()

    def block(name: str) -> BlockWeight:
        if not isinstance(blocks.get(name), BlockWeight):
            raise ModelLoadError(f"the GGUF file has no quantized tensor {name}")
        placed.add(name)
        return blocks[name]

    def dense(name: str) -> torch.Tensor:
        if not isinstance(blocks.get(name), torch.Tensor) or tuple(blocks[name].shape) != (cfg.hidden_size,):
            raise ModelLoadError(f"the GGUF file has no ({cfg.hidden_size},) tensor {name}")
        placed.add(name)
        return blocks[name].float().contiguous()

    norms = [tuple(dense(f"blk.{i}.{short}.weight") for short in NORMS) for i in range(cfg.num_hidden_layers)]
    model = LlamaShell(cfg, norms, dense("output_norm.weight"))
    for i, layer in enumerate(model.model.layers):
        for short, path in LLAMA_LINEARS.items():
            parent, attr = path.split(".")
            setattr(getattr(layer, parent), attr, BlockLinear(block(f"blk.{i}.{short}.weight"), kernels))
        # q/k/v and gate/up as one product each, where read_blocks could join them (parts of one kind)
        if f"blk.{i}.attn_qkv.weight" in blocks:
            layer.self_attn.qkv_blocks = BlockLinear(block(f"blk.{i}.attn_qkv.weight"), kernels)
        if f"blk.{i}.ffn_gate_up.weight" in blocks:
            layer.mlp.gate_up_blocks = BlockLinear(block(f"blk.{i}.ffn_gate_up.weight"), kernels)
    embed = block("token_embd.weight")
    model.model.embed_tokens = BlockEmbedding(embed)
    model.lm_head = BlockLinear(block("output.weight") if "output.weight" in blocks else embed, kernels)
    left = set(blocks) - placed
    if left:
        raise ModelLoadError(f"the GGUF file holds tensors gridserve does not place: {', '.join(sorted(left)[:5])}")
    model.gridserve_kernels = kernels  # the Llama runner's attention and norms use them too
    return model.eval()


def describe(blocks: dict, amx: bool = False) -> str:
    """What serves the weights, in words: "gguf blocks Q4_1 x210, Q8_0 x1 (float32 activations)", and
    "; prompt products on AMX" where the kernels have it."""
    counts: dict[str, int] = {}
    for name, w in blocks.items():
        if isinstance(w, BlockWeight) and name.split(".")[-2] not in JOINED:  # the file's tensors, not joins
            counts[w.kind] = counts.get(w.kind, 0) + 1
    how = "float32 activations; prompt products on AMX" if amx else "float32 activations"
    return "gguf blocks " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) + f" ({how})"
