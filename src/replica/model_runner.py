"""The model runner: weights, the KV cache of the running rows, one forward per step, a token per row."""
from __future__ import annotations

from typing import Protocol

import torch

from gridserve.replica.kv_cache import KVBatch, check_supported
from gridserve.replica.sampling import row_generator, sample_rows
from gridserve.replica.sequence import Sequence


class ModelRunner(Protocol):
    """What the engine needs from a model; every method runs in the engine thread.

    `rows` are the sequences whose context the runner holds, in batch order. `add` prefills
    newcomers (whole, or a chunk) and returns the sequences that got their next token with those
    tokens; `decode` gives every decoding row its next token; `drop_finished` frees the rows of
    finished sequences; `reset` forgets every row (after a failed step).
    """
    vocab_size: int
    rows: list[Sequence]

    def thread_setup(self, num_threads: int) -> int: ...
    def add(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]: ...
    def decode(self) -> tuple[list[Sequence], list[int]]: ...
    def drop_finished(self) -> None: ...
    def reset(self) -> None: ...


def set_torch_threads(num_threads: int) -> int:
    """Set torch's intra-op threads in the calling thread; what torch then reports."""
    torch.set_num_threads(num_threads)
    return torch.get_num_threads()


class HFRunner:
    """Any transformers causal LM with full-attention layers, on its own forward and a `KVBatch`."""

    def __init__(self, model, device: torch.device):
        check_supported(model)
        self.model = model
        self.device = device
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.rows: list[Sequence] = []
        self.batch = KVBatch(model, device)

    def thread_setup(self, num_threads: int) -> int:
        return set_torch_threads(num_threads)

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        for seq in seqs:
            if seq.generator is None:
                seq.generator = row_generator(seq.opts, self.device)
        logits = self.batch.prefill([s.context_ids for s in seqs])
        self.rows.extend(seqs)
        for seq in seqs:
            seq.computed = len(seq.context_ids)
        return seqs, sample_rows(logits, [s.opts for s in seqs], [s.generator for s in seqs])

    @torch.inference_mode()
    def decode(self) -> tuple[list[Sequence], list[int]]:
        rows = list(self.rows)
        logits = self.batch.decode([s.last_token for s in rows])
        return rows, sample_rows(logits, [s.opts for s in rows], [s.generator for s in rows])

    def drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(keep) < len(self.rows):
            self.batch.keep(keep)
            self.rows = [self.rows[i] for i in keep]

    def reset(self) -> None:
        self.rows, self.batch = [], KVBatch(self.model, self.device)
