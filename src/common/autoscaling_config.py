"""A deployment's autoscaling settings (Ray Serve's field names), validated from JSON or CLI flags."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from gridserve.common.errors import ConfigError

MAX_REPLICAS = 64  # the head's limit on replicas of one deployment


@dataclass(frozen=True)
class AutoscalingConfig:
    """How many replicas a deployment may have and how fast the count follows its load.

    The load is the deployment's ongoing plus queued requests as the proxies count them; the head aims
    for `target_ongoing_requests` per replica. A higher count must be wanted for `upscale_delay_s`, a
    lower one for `downscale_delay_s`, before the count changes; the load at each moment is averaged
    over the `look_back_period_s` before it. `min_replicas: 0` lets an idle deployment scale to zero."""
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None  # None: start at min_replicas
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0

    def __post_init__(self) -> None:
        self._check("min_replicas", 0 <= self.min_replicas <= MAX_REPLICAS, f"an integer in [0, {MAX_REPLICAS}]")
        self._check("max_replicas", max(1, self.min_replicas) <= self.max_replicas <= MAX_REPLICAS,
                    f"an integer in [max(1, min_replicas={self.min_replicas}), {MAX_REPLICAS}]")
        if self.initial_replicas is not None:
            self._check("initial_replicas", self.min_replicas <= self.initial_replicas <= self.max_replicas,
                        f"an integer in [min_replicas={self.min_replicas}, max_replicas={self.max_replicas}]")
        self._check("target_ongoing_requests", self.target_ongoing_requests > 0, "a number > 0")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            self._check(name, getattr(self, name) >= 0, "a number >= 0")
        self._check("look_back_period_s", self.look_back_period_s > 0, "a number > 0")

    def _check(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise ConfigError(f"autoscaling.{name}: must be {rule}, got {json.dumps(getattr(self, name))}")

    @property
    def start_replicas(self) -> int:
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas

    @classmethod
    def from_dict(cls, d: Any, where: str = "autoscaling", base: "AutoscalingConfig | None" = None
                  ) -> "AutoscalingConfig":
        """The fields of `d` over `base` (or the defaults); types are checked here, ranges in __post_init__."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be an object")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: unknown field (known: {', '.join(sorted(known))})")
        values = asdict(base) if base else {}
        for key, value in d.items():
            ints = key.endswith("_replicas")
            ok = (isinstance(value, int) if ints else isinstance(value, (int, float))) and not isinstance(value, bool)
            if not ok and not (key == "initial_replicas" and value is None):
                raise ConfigError(f"{where}.{key}: must be {'an integer' if ints else 'a number'}, "
                                  f"got {json.dumps(value)}")
            values[key] = value if ints or value is None else float(value)
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(e.message.replace("autoscaling.", f"{where}.", 1)) from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AutoscalingConfig | None":
        return cls.from_dict(json.loads(text)) if text else None
