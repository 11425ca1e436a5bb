"""The step-time model of one instance, read from a calibration JSON.

    step_s = a + b * batch_tokens + c * kv_bytes_read + d * bytes_exchanged (+ e if any exchange)

`a` is per-step overhead (launches, Python, sampling), `b` the dense-layer cost per token, `c`
attention's memory-bound cost per KV byte read, `d` the interconnect cost per byte sent to or
from other instances (queries out, partial outputs and log-sum-exps back, migrated KV), `e` the
fixed latency of a step that exchanges at all (two all_to_alls per layer). Keys starting with
`_` and the free-text `hardware` and `model` are documentation; any other unknown key is an error
so a typo can't silently fall back to a default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration_cpu_tiny.json")


@dataclass(frozen=True, slots=True)
class CostModel:
    step_overhead_s: float  # a
    per_token_s: float  # b
    per_kv_byte_s: float  # c
    per_exchange_byte_s: float  # d
    exchange_step_s: float  # e
    kv_bytes_per_token: int  # K and V of one token, all layers
    exchange_bytes_per_token: int  # per query token per remote instance, all layers
    hardware: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and v < 0:
                raise ValueError(f"calibration field {f.name} must be >= 0, got {v}")
        if self.per_token_s <= 0:
            raise ValueError("calibration field per_token_s must be > 0")

    @classmethod
    def from_json(cls, path: str | Path = DEFAULT_CALIBRATION) -> CostModel:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"{path}: unknown calibration fields {unknown}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data
                         and f.name not in ("hardware", "model"))
        if missing:
            raise ValueError(f"{path}: missing calibration fields {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def efficient_batch_tokens(self) -> int:
        """Tokens per step at which dense work equals the fixed overhead (50% efficiency)."""
        return max(1, math.ceil(self.step_overhead_s / self.per_token_s))

    def step_s(self, batch_tokens: int, kv_bytes: int, exchange_bytes: int) -> float:
        s = (self.step_overhead_s + self.per_token_s * batch_tokens
             + self.per_kv_byte_s * kv_bytes)
        if exchange_bytes:
            s += self.exchange_step_s + self.per_exchange_byte_s * exchange_bytes
        return s
