"""Per-row sampling: greedy rows, seeded rows independent of their batch, top-k and top-p cuts."""
from __future__ import annotations

import collections

import pytest
import torch

from gridserve.replica import sampling
from gridserve.common.request_contract import SamplingOptions
from gridserve.replica.sampling import row_generator, sample_rows

CPU = torch.device("cpu")
VOCAB = 2000


def opts(**kw) -> SamplingOptions:
    return SamplingOptions(max_tokens=1, **kw)


def draw(logits: torch.Tensor, options: list[SamplingOptions]) -> list[int]:
    return sample_rows(logits, options, [row_generator(o, CPU) for o in options])


def peaky_logits(rows: int, seed: int = 0) -> torch.Tensor:
    """Logits shaped like a language model's: a few likely tokens, a long unlikely tail."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 2 + torch.linspace(12, 0, VOCAB) ** 1.5 / 4


def test_greedy_rows_take_the_argmax_and_need_no_generator():
    logits = peaky_logits(4)
    assert row_generator(opts(temperature=0.0, seed=3), CPU) is None
    assert draw(logits, [opts()] * 4) == logits.argmax(dim=-1).tolist()


def test_a_seeded_row_draws_the_same_token_whatever_rows_share_the_batch():
    logits = peaky_logits(7, seed=1)
    mixed = [opts(temperature=0.8, top_p=0.9, seed=5), opts(), opts(temperature=1.0, top_k=5),
             opts(temperature=1.3, seed=9), opts(temperature=0.5, top_p=0.5, top_k=40, seed=1), opts(),
             opts(temperature=1.0, top_k=VOCAB // 2, seed=3)]  # a cut beyond the candidates: a full sort
    together = draw(logits, mixed)
    alone = [draw(logits[i:i + 1], [o])[0] for i, o in enumerate(mixed) if o.seed is not None or o.temperature == 0]
    assert [t for t, o in zip(together, mixed) if o.seed is not None or o.temperature == 0] == alone
    assert draw(logits, mixed) != draw(logits, [*mixed[:3], opts(temperature=1.3, seed=10), *mixed[4:]])


def frequencies(logits: torch.Tensor, o: SamplingOptions, n: int = 3000) -> collections.Counter:
    gen = row_generator(SamplingOptions(max_tokens=1, temperature=o.temperature, seed=1), CPU)
    return collections.Counter(sample_rows(logits, [o], [gen])[0] for _ in range(n))


@pytest.mark.parametrize("o,allowed,expected", [
    (opts(temperature=1.0), {0, 1, 2}, {0: 0.5, 1: 0.3, 2: 0.2}),
    (opts(temperature=1.0, top_k=2), {0, 1}, {0: 0.625, 1: 0.375}),
    (opts(temperature=1.0, top_p=0.6), {0, 1}, {0: 0.625, 1: 0.375}),  # 0.5 + 0.3 reach 0.6
    (opts(temperature=1.0, top_p=0.4), {0}, {0: 1.0}),                  # the top token always stays
])
def test_samples_follow_the_cut_distribution(o, allowed, expected):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    counts = frequencies(logits, o)
    assert set(counts) <= allowed
    for token, p in expected.items():
        assert counts[token] / 3000 == pytest.approx(p, abs=0.03)


def test_candidate_shortcut_picks_what_a_full_sort_picks(monkeypatch):
    logits = peaky_logits(8, seed=2)
    options = [opts(temperature=0.7, top_p=0.9, seed=i) for i in range(4)] + \
              [opts(temperature=1.0, top_k=30, seed=i) for i in range(4)]
    fast = draw(logits, options)
    monkeypatch.setattr(sampling, "CANDIDATES", VOCAB)  # every row sorts the whole vocabulary
    assert draw(logits, options) == fast
