"""The fast model runner for Llama-family models: an in-place slot KV cache, chunked prefill, prefix reuse."""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from gridserve.replica.gguf_blocks import PromptRows
from gridserve.replica.llama_layers import EagerLayers
from gridserve.replica.model_runner import set_torch_threads
from gridserve.replica.sampling import row_generator, sample_rows
from gridserve.replica.sequence import Sequence

MODEL_TYPES = ("llama",)
# Prompt tokens one step prefills, over all rows still prefilling: running rows wait at most one
# such chunk (plus their own decode) for a long prompt to arrive.
PREFILL_CHUNK = 128
# Where the attention kernel serves the model, prompt tokens at this position and later are attended
# by torch (a batched product per row) instead: the kernel is faster for short contexts, torch for long.
KERNEL_PROMPT_POSITIONS = 256


def supports(model) -> bool:
    """Plain Llama decoder layers (SmolLM2, TinyLlama, the tiny test model): full attention, RoPE."""
    cfg = model.config
    return (getattr(cfg, "model_type", "") in MODEL_TYPES and not getattr(cfg, "sliding_window", None)
            and hasattr(getattr(model, "model", None), "rotary_emb"))


@dataclass
class PromptTokens:
    cached: int = 0     # prompt tokens whose keys and values were reused from the prefix cache
    prefilled: int = 0  # prompt tokens the model computed


class SlotCache:
    """Keys and values of every layer, `[slots, kv_heads, max_len, head_dim]`, allocated once.

    A row owns a slot while it runs; a position is written once, in place, so a step costs the same
    at token 10 and token 1,000 and a join or leave copies nothing. A free slot keeps its contents:
    `tokens[slot]` are the ids whose keys and values it holds, the prefix cache that newcomers sharing
    a prefix (a chat template's system prompt, a conversation's earlier turns) start from. Memory
    is reserved, not touched, until positions are written.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [_lazy_zeros(shape, dtype, device) for _ in range(layers)]
        self.v = [_lazy_zeros(shape, dtype, device) for _ in range(layers)]
        self.tokens: list[list[int]] = [[] for _ in range(slots)]
        self.owner: list[Sequence | None] = [None] * slots

    def best_prefix(self, ids: list[int]) -> tuple[int, int]:
        """(slot, length) of the longest prefix of `ids` some slot holds; (-1, 0) if none."""
        best, best_len = -1, 0
        for slot, held in enumerate(self.tokens):
            n = _common_prefix(held, ids)
            if n > best_len or (n == best_len and n and self.owner[slot] is None and self.owner[best] is not None):
                best, best_len = slot, n
        return best, best_len

    def take(self, seq: Sequence) -> int:
        """A free slot for `seq`, starting from the longest cached prefix of its context (never all of it:
        the last token is computed, for its logits). Sets seq.slot and seq.computed; the cached length."""
        ids = seq.context_ids
        src, n = self.best_prefix(ids[:-1])
        free = [s for s, o in enumerate(self.owner) if o is None]
        slot = src if src in free else min(free, key=lambda s: (_common_prefix(self.tokens[s], ids) > 0, s))
        if src >= 0 and src != slot and n:
            for layer in range(len(self.k)):
                self.k[layer][slot, :, :n] = self.k[layer][src, :, :n]
                self.v[layer][slot, :, :n] = self.v[layer][src, :, :n]
        self.tokens[slot] = ids[:n]
        self.owner[slot] = seq
        seq.slot, seq.computed = slot, n
        return n

    def release(self, seq: Sequence) -> None:
        if seq.slot is not None and self.owner[seq.slot] is seq:
            self.owner[seq.slot] = None
        seq.slot = None

    def clear(self) -> None:
        self.tokens = [[] for _ in self.tokens]
        self.owner = [None] * len(self.owner)


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros that take memory only where written. Positions a row masks out must still be finite
    (0 x NaN is NaN in attention), so the cache cannot be `torch.empty`; on CPU an anonymous mapping
    gives fresh zero pages from the kernel instead of writing zeros over all of them. Huge pages are
    refused for it: one row's write would take 2 MiB instead of 4 KiB (numpy, which this used, asks
    for huge pages, and a 16-row cache then took ~1.4 GiB at short contexts)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = 1
    for n in shape:
        count *= n
    size = max(1, count * torch.finfo(dtype).bits // 8)
    raw = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        raw.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(raw, dtype=dtype, count=count).view(shape)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaRunner:
    """Runs the model's own modules (embedding, norms, projections, MLP, head) with its own attention
    over a `SlotCache`, every row's tokens flattened into one forward per step.

    Each step feeds every row the tokens it has not computed yet: one token for a decoding row, up
    to `prefill_chunk` prompt tokens (shared by the rows still prefilling, oldest first) for the
    others. A row whose context is then complete gets its next token. Positions and attention are
    per row, so each row computes what it would alone.
    """

    def __init__(self, model, device: torch.device, max_rows: int, max_len: int, prefill_chunk: int = PREFILL_CHUNK):
        cfg = model.config
        self.model, self.inner, self.device = model, model.model, device
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.heads // self.kv_heads
        self.scaling = self.inner.layers[0].self_attn.scaling
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        dtype = self.inner.norm.weight.dtype  # the embedding may be GGUF blocks (gguf_blocks)
        with torch.inference_mode():
            dummy = torch.zeros(1, dtype=dtype, device=device)
            cos, sin = self.inner.rotary_emb(dummy, torch.arange(max_len, device=device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        self.rows: list[Sequence] = []
        self.prompt_tokens = PromptTokens()
        self.dense = EagerLayers(model, self.heads, self.kv_heads, self.head_dim)
        # Keys and values in the kernels' float16 where the GGUF block kernels serve the model (half the
        # memory of float32); in the model's dtype otherwise.
        kv_dtype = self.dense.kernels.kv_dtype if self.dense.kernels is not None else dtype
        self.cache = SlotCache(len(self.inner.layers), max_rows, self.kv_heads, max_len, self.head_dim, kv_dtype,
                               device)
        # Decoding rows' attention in one kernel call per layer where the model is served by the GGUF
        # block kernels (float32 on CPU); otherwise scaled_dot_product_attention over the slot range.
        self.kernels = self.dense.kernels if self.head_dim % 16 == 0 else None

    def thread_setup(self, num_threads: int) -> int:
        return set_torch_threads(num_threads)

    def add(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """Give each newcomer a slot (from the prefix cache where it can); they are fed by `decode`.
        Nothing is added when one of them cannot run (the engine then retries each alone)."""
        for seq in seqs:
            bad = next((t for t in seq.context_ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is outside the vocabulary of {self.vocab_size} ids")
        for seq in seqs:
            if seq.generator is None:
                seq.generator = row_generator(seq.opts, self.device)
            cached = min(self.cache.take(seq), len(seq.prompt_ids))
            seq.cached_tokens = cached
            self.prompt_tokens.cached += cached
            self.prompt_tokens.prefilled += max(0, len(seq.prompt_ids) - cached)
            self.rows.append(seq)
        return [], []

    def drop_finished(self) -> None:
        for seq in self.rows:
            if seq.finished:
                self.cache.release(seq)
        self.rows = [s for s in self.rows if not s.finished]

    def reset(self) -> None:
        for seq in self.rows:
            seq.slot = None
        self.rows = []
        self.cache.clear()

    @torch.inference_mode()
    def decode(self) -> tuple[list[Sequence], list[int]]:
        """One forward for every row's next tokens; the rows that completed their context and their tokens."""
        spans = self._plan()
        ids, positions, slots, done, last = [], [], [], [], []
        for seq, start, end in spans:
            ctx = seq.context_ids
            ids.extend(ctx[start:end])
            positions.extend(range(start, end))
            slots.extend([seq.slot] * (end - start))
            if end == len(ctx):
                done.append(seq)
                last.append(len(ids) - 1)
        hidden = self._forward(spans, ids, positions, slots, last)
        for seq, start, end in spans:
            self.cache.tokens[seq.slot].extend(seq.context_ids[start:end])
            seq.computed = end
        if not done:
            return [], []
        logits = self.model.lm_head(self.inner.norm(hidden))
        return done, sample_rows(logits, [s.opts for s in done], [s.generator for s in done])

    @torch.inference_mode()
    def score(self, ids: list[int]) -> float:
        """Mean negative log-likelihood of each token of `ids` after those before it, computed the way
        prompts are served (chunked, in slot 0). For quality checks; not while an engine runs it."""
        row, total = SimpleNamespace(slot=0, prompt_ids=ids), 0.0
        for a in range(0, len(ids) - 1, self.prefill_chunk):
            b = min(len(ids) - 1, a + self.prefill_chunk)
            hidden = self._forward([(row, a, b)], ids[a:b], list(range(a, b)), [0] * (b - a), list(range(b - a)))
            logp = torch.log_softmax(self.model.lm_head(self.inner.norm(hidden)).float(), dim=-1)
            total -= float(logp.gather(1, torch.tensor(ids[a + 1:b + 1], device=self.device)[:, None]).sum())
        self.cache.tokens[0] = []
        return total / (len(ids) - 1)

    def _plan(self) -> list[tuple[Sequence, int, int]]:
        """(row, first, end) of the tokens each row is fed this step: decoding rows first."""
        decoding = [s for s in self.rows if len(s.context_ids) - s.computed == 1]
        spans = [(s, s.computed, s.computed + 1) for s in decoding]
        budget = self.prefill_chunk
        for seq in self.rows:
            todo = len(seq.context_ids) - seq.computed
            if todo > 1 and budget > 0:
                n = min(todo, budget)
                spans.append((seq, seq.computed, seq.computed + n))
                budget -= n
        return spans

    def _forward(self, spans, ids, positions, slots, last) -> torch.Tensor:
        """The layers over the flattened tokens; the hidden states at `last` (before the final norm)."""
        dev = self.device
        x = self.inner.embed_tokens(torch.tensor(ids, dtype=torch.long, device=dev))
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [T, 1, head_dim]
        plan = self._attention_plan(spans)
        # Where each token's key and value go in a layer's cache viewed as [slots * kv_heads * max_len, head_dim]
        heads = torch.arange(self.kv_heads, device=dev)
        at = ((slot_t[:, None] * self.kv_heads + heads) * self.max_len + pos[:, None]).reshape(-1)
        if self.dense.fused:
            delta, prompt = None, self._prompt_rows(spans)
            for i in range(len(self.inner.layers)):
                q = self.dense.attention_input(i, x, delta, cos[:, 0], sin[:, 0], self.cache.k[i], self.cache.v[i], at,
                                               prompt)
                delta = self.dense.mlp_delta(i, x, self._attend(i, q, plan), prompt)
            return (x + delta)[last]
        for i in range(len(self.inner.layers)):
            q, k, v = self.dense.qkv(i, x, cos, sin)
            for cache, new in ((self.cache.k[i], k), (self.cache.v[i], v)):
                cache.view(-1, self.head_dim).index_copy_(0, at, new.reshape(-1, self.head_dim).to(cache.dtype))
            x = self.dense.finish(i, x, self._attend(i, q, plan))
        return x[last]

    def _prompt_rows(self, spans) -> PromptRows | None:
        """Which of the step's tokens are prompt tokens, where the kernels compute those apart (AMX)."""
        if not self.dense.kernels.amx:
            return None
        return PromptRows([p < len(seq.prompt_ids) for seq, a, b in spans for p in range(a, b)])

    def _attention_plan(self, spans) -> list[tuple]:
        """Per group of rows, what `_attend` needs; built once per step, used by every layer."""
        if self.kernels is not None:
            return self._kernel_attention_plan(spans)
        plan, decoding = [], [(s, a) for s, a, b in spans if b - a == 1]
        if decoding:
            slots = [s.slot for s, _ in decoding]
            lo, hi = min(slots), max(slots) + 1
            length = max(a for _, a in decoding) + 1
            mask = None  # rows all as long as the longest: nothing to hide (always so for one row)
            if any(a + 1 != length for _, a in decoding):
                mask = torch.zeros(hi - lo, 1, 1, length, dtype=torch.bool, device=self.device)
                mask[:, :, :, 0] = True  # rows of free slots in the range attend to something; their output is unused
                for (s, a) in decoding:
                    mask[s.slot - lo, :, :, :a + 1] = True
            index = torch.tensor([s - lo for s in slots], dtype=torch.long, device=self.device)
            plan.append(("decode", len(decoding), lo, hi, length, mask, index))
        plan += [self._prefill_item(seq.slot, a, b) for seq, a, b in spans if b - a > 1]
        return plan

    def _prefill_item(self, slot: int, a: int, b: int) -> tuple:
        """The plan item for torch's attention of slot's queries at positions a..b-1: causal, over
        every position before each (the cached prefix included)."""
        mask = torch.arange(b, device=self.device)[None, :] <= torch.arange(a, b, device=self.device)[:, None]
        return ("prefill", b - a, slot, mask.repeat(self.group, 1))

    def _kernel_attention_plan(self, spans) -> list[tuple]:
        """With the attention kernel: a token is one query over its own slot's positions up to its own
        (this step's keys are in the cache already), so a prompt token is computed as it would be were
        it decoded, and a resumed stream's replayed tokens exactly as their first replica decoded them.
        Prompt tokens from position KERNEL_PROMPT_POSITIONS on go to torch's attention instead, one call
        per row: the kernel reads a row's keys once per query, which costs more than a batched product
        over long contexts (a 2,000-token prompt's last chunks)."""
        plan: list[tuple] = []
        rows: list[tuple[int, int]] = []  # (slot, length) of the kernel's queries, in token order

        def flush() -> None:
            if rows:
                slots, lengths = zip(*rows)
                plan.append(("decode_rows", len(rows), torch.tensor(slots), torch.tensor(lengths)))
                rows.clear()

        for seq, a, b in spans:
            lo = min(max(a, KERNEL_PROMPT_POSITIONS), b)   # prompt tokens from here to hi: torch
            hi = max(lo, min(b, len(seq.prompt_ids)))
            rows.extend((seq.slot, p + 1) for p in range(a, lo))
            if hi > lo:
                flush()
                plan.append(self._prefill_item(seq.slot, lo, hi))
            rows.extend((seq.slot, p + 1) for p in range(hi, b))
        flush()
        return plan

    def _attend(self, layer: int, q: torch.Tensor, plan: list[tuple]) -> torch.Tensor:
        """Attention of the flattened queries [T, heads, dim] over each row's cached keys; [T, heads*dim].

        Grouped-query heads are folded into the query length: head h uses kv head h // group, so
        [heads, n, dim] is viewed as [kv_heads, group*n, dim] and no key or value is copied."""
        K, V = self.cache.k[layer], self.cache.v[layer]
        outs, at = [], 0
        for item in plan:
            if item[0] == "decode_rows":
                _, n, slots, lengths = item
                qd = q[at:at + n].view(n, self.kv_heads, self.group, self.head_dim)
                outs.append(self.kernels.decode_attention(qd, K, V, slots, lengths, self.scaling).reshape(n, -1))
            elif item[0] == "decode":
                _, n, lo, hi, length, mask, index = item
                qd = q.new_zeros(hi - lo, self.kv_heads, self.group, self.head_dim)
                qd[index] = q[at:at + n].view(n, self.kv_heads, self.group, self.head_dim)
                o = F.scaled_dot_product_attention(qd, K[lo:hi, :, :length].to(q.dtype), V[lo:hi, :, :length].to(q.dtype),
                                                   attn_mask=mask, scale=self.scaling)
                outs.append(o[index].reshape(n, -1))
            else:
                _, n, slot, mask = item
                end = mask.shape[1]
                qp = q[at:at + n].transpose(0, 1).reshape(1, self.kv_heads, self.group * n, self.head_dim)
                o = F.scaled_dot_product_attention(qp, K[slot:slot + 1, :, :end].to(q.dtype),
                                                   V[slot:slot + 1, :, :end].to(q.dtype),
                                                   attn_mask=mask, scale=self.scaling)
                outs.append(o.view(self.heads, n, self.head_dim).transpose(0, 1).reshape(n, -1))
            at += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)

