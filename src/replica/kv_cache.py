"""The running batch's KV cache: rows left-padded to one length, with a padding mask and per-row positions."""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from gridserve.common.errors import ModelLoadError


def check_supported(model) -> None:
    """The batch pads and slices every layer's keys and values; only plain full-attention layers allow it."""
    cache = DynamicCache(config=model.config)
    odd = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if odd:
        raise ModelLoadError("the batching engine needs full-attention KV cache layers; "
                             f"this model has {', '.join(odd)}")


class KVBatch:
    """Keys and values of every running row, `[rows, kv_heads, length, head_dim]` per layer.

    Rows are left-padded, so every row's newest token sits in the last column and one decode step
    feeds one token per row. `mask` is 1 over real tokens and 0 over padding; a row's next position
    is its number of real tokens, so positions (and outputs) are what the row would get alone.
    """

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts as one left-padded batch, append them as new rows; their last logits [n, vocab]."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
        self._append(out.cache, mask)
        return out.logits[:, -1]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One step: each row's newest token in, its next-token logits [rows, vocab] out."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        positions = self.mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache,
                         use_cache=True)
        self.cache, self.mask = out.cache, mask
        return out.logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop the columns that are padding in every row left."""
        if len(rows) == len(self):
            return
        if not rows:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.mask = self.mask.index_select(0, index)
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0])  # the first column some row still uses
        self.mask = self.mask[:, start:]
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def _append(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add rows: pad the shorter side on the left to a common length, then stack along the batch."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.length, mask.shape[1])
        self._pad_left(self.cache, width - self.length)
        self._pad_left(cache, width - mask.shape[1])
        for ours, theirs in zip(self._layers(self.cache), self._layers(cache)):
            ours.keys = torch.cat([ours.keys, theirs.keys], dim=0)
            ours.values = torch.cat([ours.values, theirs.values], dim=0)
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(mask, width)], dim=0)

    def _pad_left(self, cache: DynamicCache, n: int) -> None:
        if n <= 0:
            return
        for layer in self._layers(cache):
            layer.keys = _pad_seq(layer.keys, n)
            layer.values = _pad_seq(layer.values, n)

    @staticmethod
    def _layers(cache: DynamicCache | None) -> list[DynamicLayer]:
        return [] if cache is None else [layer for layer in cache.layers if layer.is_initialized]


def _pad_seq(states: torch.Tensor, n: int) -> torch.Tensor:
    """n zero columns before [rows, heads, length, dim] states."""
    zeros = states.new_zeros(states.shape[0], states.shape[1], n, states.shape[3])
    return torch.cat([zeros, states], dim=2)


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1)
