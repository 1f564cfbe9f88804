"""Per-row sampling for a batch of logits: greedy, temperature, top-k, top-p, each row with its own seed."""
from __future__ import annotations

import torch

from gridserve.common.request_contract import SamplingOptions

# How many of the most likely tokens a top-k/top-p row is sampled from when its cut lies within them.
CANDIDATES = 256


def row_generator(opts: SamplingOptions, device: torch.device) -> torch.Generator | None:
    """The random stream of one request: seeded when it asks for a seed, fresh otherwise; None for greedy."""
    if opts.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if opts.seed is not None:
        gen.manual_seed(opts.seed)
    else:
        gen.seed()
    return gen


def sample_rows(logits: torch.Tensor, opts: list[SamplingOptions],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` [rows, vocab]: argmax at temperature 0, else a top-k/top-p sample.

    Each sampled row draws one uniform number from its own generator and picks its token by inverse
    CDF over its own probabilities, so a seeded request gets the same tokens whatever else shares
    the batch. The top-k/top-p work (a topk, or a sort where needed) runs once for all such rows.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = [i for i, o in enumerate(opts) if o.temperature > 0]
    if rows:
        sub = [opts[i] for i in rows]
        uniforms = torch.cat([torch.rand(1, generator=generators[i], device=logits.device) for i in rows])
        picked = _sample(logits[rows], sub, uniforms)
        tokens[rows] = picked
    return tokens.tolist()


def _sample(logits: torch.Tensor, opts: list[SamplingOptions], uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens for rows that all sample. Each row takes the path its own options choose (never its
    neighbours'), so the same row, seed and logits give the same token in any batch."""
    temps = torch.tensor([o.temperature for o in opts], dtype=logits.dtype, device=logits.device)
    logits = logits / temps[:, None]
    picked = torch.empty(len(opts), dtype=torch.long, device=logits.device)
    cuts = [o.top_k > 0 or o.top_p < 1.0 for o in opts]
    for cut, path in ((False, _pick), (True, _pick_cut)):
        rows = [i for i, c in enumerate(cuts) if c == cut]
        if rows:
            picked[rows] = path(logits[rows], [opts[i] for i in rows], uniforms[rows])
    return picked


def _pick_cut(logits: torch.Tensor, opts: list[SamplingOptions], uniforms: torch.Tensor) -> torch.Tensor:
    """Rows with a top-k/top-p cut. Those whose kept set surely lies within the CANDIDATES most likely
    tokens pick among them (a cheap topk); the others sort the whole vocabulary."""
    count = min(CANDIDATES, logits.shape[1])
    values, index = torch.topk(logits, count, dim=-1)
    mass = torch.exp(torch.logsumexp(values, dim=-1) - torch.logsumexp(logits, dim=-1))
    fits = [0 < o.top_k <= count or (o.top_p < 1.0 and float(m) > o.top_p) for o, m in zip(opts, mass)]
    picked = torch.empty(len(opts), dtype=torch.long, device=logits.device)
    for fit in (True, False):
        rows = [i for i, f in enumerate(fits) if f == fit]
        if not rows:
            continue
        sub = [opts[i] for i in rows]
        if fit:
            picked[rows] = index[rows].gather(1, _pick(values[rows], sub, uniforms[rows]).unsqueeze(1)).squeeze(1)
        else:
            picked[rows] = _pick(logits[rows], sub, uniforms[rows])
    return picked


def _pick(logits: torch.Tensor, opts: list[SamplingOptions], uniforms: torch.Tensor) -> torch.Tensor:
    """Column picked per row by inverse CDF; rows that cut (all of them or none) sort first and cut."""
    order = None
    if any(o.top_k > 0 or o.top_p < 1.0 for o in opts):
        logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        logits = logits.masked_fill(_cut(logits, opts), float("-inf"))
    cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)
    u = (uniforms * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1).squeeze(1)
    return picked if order is None else order.gather(1, picked.unsqueeze(1)).squeeze(1)


def _cut(sorted_logits: torch.Tensor, opts: list[SamplingOptions]) -> torch.Tensor:
    """True where a sorted position falls outside its row's top-k or top-p set (the top token always stays)."""
    vocab = sorted_logits.shape[1]
    device = sorted_logits.device
    ks = torch.tensor([o.top_k if 0 < o.top_k < vocab else vocab for o in opts], device=device)
    ranks = torch.arange(vocab, device=device)[None, :]
    cut = ranks >= ks[:, None]
    top_p = torch.tensor([o.top_p for o in opts], dtype=sorted_logits.dtype, device=device)
    if bool((top_p < 1.0).any()):
        probs = torch.softmax(sorted_logits.masked_fill(cut, float("-inf")), dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass ranked above each token
        cut |= before > top_p[:, None]
    return cut
