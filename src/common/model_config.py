"""Validated config dataclasses: model_configs.json entries and each process's settings."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gridserve.common.autoscaling_config import AutoscalingConfig
from gridserve.common.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_CONFIGS = REPO_ROOT / "model_configs.json"
SOURCE_TYPES = ("gguf_package", "hub", "local", "package", "fake")
DTYPES = ("float32", "bfloat16", "float16")
# Weight-only quantization a model may ask for; "none" keeps the weights in `dtype`. "gguf" serves a
# GGUF source's Q4_1/Q8_0 blocks as they are, with float32 activations, through a CPU kernel
# (replica/gguf_blocks.py): the same products as the dequantized float32 model, a fraction of the
# bytes. Only kinds with a kernel that is fast on the replica's device are offered (docs/performance.md).
QUANTIZATIONS = ("none", "gguf")
TASKS = ("generate", "embedding")  # what a model's replicas serve: text generation or sentence embeddings
NO_EMBEDDING_FIELDS = ("max_tokens_limit", "sampling")  # generation settings an embedding model refuses


def _take(d: dict, key: str, where: str, kinds: tuple, default: Any = ..., check=None, rule: str = ""):
    """Read d[key], check its type (and `check`), or raise ConfigError naming where.key."""
    path = f"{where}.{key}" if where else key
    if key not in d:
        if default is ...:
            raise ConfigError(f"{path}: required field is missing")
        return default
    value = d[key]
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if ok and check is not None and not check(value):
        ok = False
    if not ok:
        names = "/".join(k.__name__ for k in kinds)
        raise ConfigError(f"{path}: must be {rule or names}, got {json.dumps(value)}")
    return value


def _no_extra(d: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: unknown field (known: {', '.join(sorted(allowed))})")


def _obj(d: dict, key: str, where: str) -> dict:
    return _take(d, key, where, (dict,), default={}, rule="an object")


NUM = (int, float)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a GGUF file in a Python package, a hub id, a local folder, or a
    transformers folder inside an installed Python package (`package`, with `path` inside it).

    "fake" has no weights: the replica's real engine (admission, cancel, resume, 429, metrics) runs
    with a model runner that streams deterministic words at `tokens_per_second` per stream, after
    `prefill_delay_s` per prefill; for load and autoscaling tests without a model.
    """
    type: str
    package: str = ""
    file: str = ""
    repo: str = ""
    revision: str = ""
    path: str = ""
    tokens_per_second: float = 0.0
    prefill_delay_s: float = 0.0

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "ModelSource":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be an object")
        kind = _take(d, "type", where, (str,), check=lambda v: v in SOURCE_TYPES,
                     rule=f"one of {', '.join(SOURCE_TYPES)}")
        if kind == "fake":
            return cls._fake(d, where)
        need = {"gguf_package": ("package", "file"), "hub": ("repo",), "local": ("path",),
                "package": ("package",)}[kind]
        allowed = {"type", *need, "revision"} if kind == "hub" else {"type", *need}
        if kind in ("local", "package"):
            allowed.add("file" if kind == "local" else "path")
        _no_extra(d, allowed, where)
        vals = {k: _take(d, k, where, (str,), check=bool, rule="a non-empty string") for k in need}
        rest = {k: _take(d, k, where, (str,), default="") for k in allowed - set(need) - {"type"}}
        return cls(type=kind, **vals, **rest)

    @classmethod
    def _fake(cls, d: dict, where: str) -> "ModelSource":
        _no_extra(d, {"type", "tokens_per_second", "prefill_delay_s"}, where)
        tps = _take(d, "tokens_per_second", where, NUM, check=lambda v: 0 < v <= 100000, rule="a number in (0, 100000]")
        delay = _take(d, "prefill_delay_s", where, NUM, 0.0, lambda v: 0 <= v <= 600, "a number in [0, 600]")
        return cls(type="fake", tokens_per_second=float(tps), prefill_delay_s=float(delay))

    def describe(self) -> str:
        if self.type == "fake":
            return f"fake ({self.tokens_per_second:g} tokens/s per stream)"
        if self.type == "gguf_package":
            return f"{self.package}/{self.file}"
        if self.type == "hub":
            return self.repo + (f"@{self.revision}" if self.revision else "")
        if self.type == "package":
            return f"{self.package}/{self.path}" if self.path else self.package
        return self.path


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "SamplingDefaults":
        _no_extra(d, {"temperature", "top_p", "top_k", "max_new_tokens"}, where)
        return cls(
            temperature=float(_take(d, "temperature", where, NUM, 0.7, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
            top_p=float(_take(d, "top_p", where, NUM, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
            top_k=_take(d, "top_k", where, (int,), 0, lambda v: v >= 0, "an integer >= 0"),
            max_new_tokens=_take(d, "max_new_tokens", where, (int,), 256, lambda v: v >= 1, "an integer >= 1"),
        )


MEMORY_UNITS = {"": 2**20, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "ki": 2**10, "m": 2**20,
                "mb": 10**6, "mib": 2**20, "mi": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "gi": 2**30,
                "t": 2**40, "tb": 10**12, "tib": 2**40, "ti": 2**40}
MEMORY_RULE = 'a size such as "1200MiB", "1.5GiB" or "2GB" (a bare number is MiB)'


def parse_memory_mb(value: Any, where: str) -> int:
    """A memory size in operator units ("1.2GiB", "1200MB", "512Mi", 900) to whole MiB, rounded up."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        digits = len(text) - len(text.lstrip("0123456789."))
        number_text, unit = text[:digits], text[digits:].lower()
        try:
            number = float(number_text)
        except ValueError:
            number, unit = -1.0, "?"
    else:
        number, unit = -1.0, "?"
    if unit not in MEMORY_UNITS or not math.isfinite(number) or number < 0:
        raise ConfigError(f"{where}: must be {MEMORY_RULE}, got {json.dumps(value)}")
    return math.ceil(number * MEMORY_UNITS[unit] / 2**20)


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int = 0  # MiB a replica may hold (its RSS); 0: no limit. "memory" gives it in any unit.

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Resources":
        _no_extra(d, {"num_cpus", "num_gpus", "memory_mb", "memory"}, where)
        if "memory" in d and "memory_mb" in d:
            raise ConfigError(f"{where}.memory: give either memory or memory_mb, not both")
        memory_mb = _take(d, "memory_mb", where, (int,), 0, lambda v: v >= 0, "an integer >= 0")
        if "memory" in d:
            memory_mb = parse_memory_mb(d["memory"], f"{where}.memory")
        return cls(
            num_cpus=float(_take(d, "num_cpus", where, NUM, 1.0, lambda v: v > 0, "a number > 0")),
            num_gpus=float(_take(d, "num_gpus", where, NUM, 0.0, lambda v: v >= 0, "a number >= 0")),
            memory_mb=memory_mb,
        )


@dataclass(frozen=True)
class ModelConfig:
    """One deployable model: its source, limits, sampling defaults and the resources a replica takes."""
    name: str
    source: ModelSource
    context_length: int
    max_tokens_limit: int
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    resources: Resources = field(default_factory=Resources)
    dtype: str = "float32"
    quantization: str = "none"
    max_batch_size: int = 8
    max_waiting: int = 32
    description: str = ""
    # With work queued or running, a replica whose engine finishes no step for this long reports
    # NOT_SERVING (and is replaced). 60 s leaves room for a slow CPU prefill of a long prompt on a 7B model.
    stall_timeout_s: float = 60.0
    # "generate" (chat and completions) or "embedding" (POST /v1/embeddings). For an embedding model,
    # context_length is the most tokens one input may have, max_batch_size the inputs in one forward
    # pass and max_waiting the inputs queued beyond them; max_tokens_limit is 0 and sampling unused.
    task: str = "generate"
    autoscaling: AutoscalingConfig | None = None  # None: a fixed replica count (see docs/autoscaling.md)

    FIELDS = ("source", "context_length", "max_tokens_limit", "sampling", "resources", "dtype", "quantization",
              "max_batch_size", "max_waiting", "description", "stall_timeout_s", "task", "autoscaling")

    @classmethod
    def from_dict(cls, name: str, d: Any, where: str = "") -> "ModelConfig":
        where = where or f"models.{name}"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be an object")
        _no_extra(d, set(cls.FIELDS), where)
        task = _take(d, "task", where, (str,), "generate", lambda v: v in TASKS, f"one of {', '.join(TASKS)}")
        if task == "embedding":
            return cls._embedding(name, d, where)
        ctx = _take(d, "context_length", where, (int,), check=lambda v: v >= 16, rule="an integer >= 16")
        limit = _take(d, "max_tokens_limit", where, (int,), check=lambda v: 1 <= v <= ctx,
                      rule=f"an integer in [1, context_length={ctx}]")
        sampling = SamplingDefaults.from_dict(_obj(d, "sampling", where), f"{where}.sampling")
        if sampling.max_new_tokens > limit:
            raise ConfigError(f"{where}.sampling.max_new_tokens: must be <= max_tokens_limit={limit}, "
                              f"got {sampling.max_new_tokens}")
        config = cls(
            name=name,
            source=ModelSource.from_dict(_take(d, "source", where, (dict,), rule="an object"), f"{where}.source"),
            context_length=ctx,
            max_tokens_limit=limit,
            sampling=sampling,
            **cls._common(d, where),
        )
        config._check_quantization(where)
        return config

    def _check_quantization(self, where: str) -> None:
        if self.quantization != "gguf":
            return
        if self.task != "generate":
            raise ConfigError(f"{where}.quantization: \"gguf\" is for generation models only")
        if not (self.source.type == "gguf_package" or (self.source.type == "local" and self.source.file)):
            raise ConfigError(f"{where}.quantization: \"gguf\" needs a GGUF file (source type gguf_package, or "
                              f"local with a file); {self.source.type} has none")
        if self.dtype != "float32":
            raise ConfigError(f"{where}.quantization: \"gguf\" computes with float32 activations; set dtype "
                              f"\"float32\" (got {self.dtype!r})")

    @classmethod
    def _embedding(cls, name: str, d: dict, where: str) -> "ModelConfig":
        """An embedding model's entry: no generation settings; context_length bounds one input."""
        for key in NO_EMBEDDING_FIELDS:
            if key in d:
                raise ConfigError(f"{where}.{key}: does not apply to an embedding model (task \"embedding\" "
                                  f"generates no tokens); remove it")
        ctx = _take(d, "context_length", where, (int,), check=lambda v: v >= 16, rule="an integer >= 16")
        config = cls(name=name, task="embedding", context_length=ctx, max_tokens_limit=0,
                     source=ModelSource.from_dict(_take(d, "source", where, (dict,), rule="an object"),
                                                  f"{where}.source"),
                     **cls._common(d, where))
        config._check_quantization(where)
        return config

    @staticmethod
    def _common(d: dict, where: str) -> dict:
        """The fields every task shares, validated."""
        return dict(
            resources=Resources.from_dict(_obj(d, "resources", where), f"{where}.resources"),
            dtype=_take(d, "dtype", where, (str,), "float32", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
            quantization=_take(d, "quantization", where, (str,), "none", lambda v: v in QUANTIZATIONS,
                               f"one of {', '.join(QUANTIZATIONS)}"),
            max_batch_size=_take(d, "max_batch_size", where, (int,), 8, lambda v: v >= 1, "an integer >= 1"),
            max_waiting=_take(d, "max_waiting", where, (int,), 32, lambda v: v >= 0, "an integer >= 0"),
            description=_take(d, "description", where, (str,), ""),
            stall_timeout_s=float(_take(d, "stall_timeout_s", where, NUM, 60.0, lambda v: v > 0, "a number > 0")),
            autoscaling=AutoscalingConfig.from_dict(d["autoscaling"], f"{where}.autoscaling")
            if "autoscaling" in d else None,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("name")
        d["source"] = {k: v for k, v in d["source"].items() if v}
        if d["autoscaling"] is None:
            d.pop("autoscaling")
        if self.task == "embedding":
            for key in NO_EMBEDDING_FIELDS:
                d.pop(key)
        return d

    def to_json(self) -> str:
        return json.dumps({"name": self.name, **self.to_dict()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"model config JSON is unreadable: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ConfigError("model config JSON: must be an object with a string 'name'")
        return cls.from_dict(d.pop("name"), d)


@dataclass(frozen=True)
class ModelCatalog:
    """model_configs.json: the models a cluster can deploy, and the default one."""
    default_model: str
    models: dict[str, ModelConfig]
    path: str = ""

    def get(self, name: str) -> ModelConfig | None:
        return self.models.get(name)

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> "ModelCatalog":
        if not isinstance(d, dict):
            raise ConfigError(f"{path or 'model configs'}: must be a JSON object")
        _no_extra(d, {"default_model", "models", "$comment"}, "")
        models_raw = _take(d, "models", "", (dict,), check=bool, rule="a non-empty object")
        models = {}
        for name, entry in models_raw.items():
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ConfigError(f"models.{name}: model names use letters, digits, '-', '_' and '.' only")
            models[name] = ModelConfig.from_dict(name, entry)
        default = _take(d, "default_model", "", (str,), check=lambda v: v in models,
                        rule=f"the name of a model in 'models' ({', '.join(models)})")
        return cls(default_model=default, models=models, path=path)


def load_model_catalog(path: str | Path | None = None) -> ModelCatalog:
    """Read and validate model_configs.json; every error names the file and the field."""
    p = Path(path) if path else DEFAULT_MODEL_CONFIGS
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: model configs file not found") from None
    except ValueError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    try:
        return ModelCatalog.from_dict(raw, str(p))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e.message}") from None


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') to a pair; ConfigError on anything else."""
    host, sep, port = value.rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"address {value!r}: expected HOST:PORT")
        host, port = value, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {value!r}: expected HOST:PORT with a port in 1..65535")
    return host, int(port)
