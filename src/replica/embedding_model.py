"""Loads an embedding model (a transformers encoder and its tokenizer) and pools its output as sentence-transformers does."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gridserve.common.errors import ConfigError, ModelLoadError
from gridserve.common.model_config import ModelConfig
from gridserve.replica.model_loader import DTYPES, _hub_error, package_dir, quiet_transformers


def mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[rows, tokens, dim] hidden states and a [rows, tokens] attention mask to [rows, dim] unit vectors.

    The mean over the tokens the mask keeps (padding excluded), then L2 normalisation: what the
    sentence-transformers Pooling (mean tokens) and Normalize modules compute. In float32 whatever
    the model's dtype.
    """
    m = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)
    pooled = summed / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows to (ids, attention mask), padded on the right so positions match each row alone."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


@dataclass
class LoadedEmbedder:
    """An encoder ready for the embedding engine: `encode` turns texts into ids, `embed` ids into vectors."""
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    source: str
    dimensions: int
    from_cache: bool = False  # read as-is from its folder; kept for the replica's model_loaded line
    load_seconds: float = 0.0
    _encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Texts to token ids with the tokenizer's special tokens ([CLS] ... [SEP] for BERT), untruncated."""
        with self._encode_lock:
            return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    @torch.inference_mode()
    def embed(self, rows: list[list[int]]) -> torch.Tensor:
        """One forward pass over right-padded rows; [rows, dimensions] float32 unit vectors on the CPU."""
        ids, mask = pad_right(rows, self.pad_id)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return mean_pool_normalize(out.last_hidden_state, mask.to(self.device)).cpu()


def _where(config: ModelConfig) -> tuple[str, dict]:
    """What from_pretrained is given for a source: a folder, or a hub repo with its revision."""
    src = config.source
    if src.type == "hub":
        return src.repo, {"revision": src.revision or None}
    if src.type == "gguf_package" or (src.type == "local" and src.file):
        raise ConfigError(f"models.{config.name}.source: an embedding model loads from a transformers folder "
                          f"(config.json and safetensors), not a GGUF file")
    folder = package_dir(src.package) / src.path if src.type == "package" else Path(src.path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json")
    return str(folder), {}


def load_embedder(config: ModelConfig) -> LoadedEmbedder:
    """Load what `config` names with AutoModel (no head); ModelLoadError/ConfigError when it cannot be."""
    from transformers import AutoModel, AutoTokenizer
    quiet_transformers()
    start = time.monotonic()
    device = torch.device("cuda" if config.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    where, kw = _where(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModel.from_pretrained(where, dtype=DTYPES[config.dtype], **kw)
    except (OSError, ValueError) as e:
        if config.source.type == "hub":
            raise _hub_error(config.source.repo, e) from None
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model '{config.name}' from {config.source.describe()}: {first}") from None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and config.context_length > max_pos:
        raise ConfigError(f"models.{config.name}.context_length={config.context_length} exceeds the model's "
                          f"max_position_embeddings={max_pos}")
    model.to(device).eval()
    return LoadedEmbedder(config=config, model=model, tokenizer=tokenizer, device=device,
                          source=config.source.describe(), dimensions=int(model.config.hidden_size),
                          load_seconds=time.monotonic() - start)
