"""The step-time model of one instance, read from a calibration JSON.

    step_s = a + b * batch_tokens + c * kv_bytes_read + d * bytes_exchanged (+ e if any exchange)

`a` is per-step overhead (launches, Python, sampling), `b` the dense-layer cost per token, `c`
attention's memory-bound cost per KV byte read, `d` the interconnect cost per byte sent to or
from other instances (queries out, partial outputs and log-sum-exps back, migrated KV), `e` the
fixed latency of a step that exchanges at all (two all_to_alls per layer). Keys starting with
`_` and the free-text `hardware` and `model` are documentation; any other unknown key is an error
so a typo can't silently fall back to a default.

A lockstep step of the whole cluster, as the engine runs it (`cluster_step_s`), adds two things a
calibration measures about the cluster it ran on: `sync_step_s` (rank 0's plan, the broadcast and
the gather, once per step) and `parallel_instances`, how many instances compute at the same time
(on one CPU, its cores; 0 when each instance has its own device). Every instance with a batch
computes `a + b*tokens + c*kv_bytes`; the step lasts the larger of the slowest of them and all of
them spread over `parallel_instances`, plus the exchange of the slowest exchanging instance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration_cpu_tiny.json")
_OPTIONAL = ("sync_step_s", "parallel_instances", "hardware", "model")


@dataclass(frozen=True, slots=True)
class CostModel:
    step_overhead_s: float  # a
    per_token_s: float  # b
    per_kv_byte_s: float  # c
    per_exchange_byte_s: float  # d
    exchange_step_s: float  # e
    kv_bytes_per_token: int  # K and V of one token, all layers
    exchange_bytes_per_token: int  # per query token per remote instance, all layers
    sync_step_s: float = 0.0  # lockstep only: plan, broadcast and gather, once per step
    parallel_instances: float = 0.0  # lockstep only: instances computing at once; 0 = all
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
                         and f.name not in _OPTIONAL)
        if missing:
            raise ValueError(f"{path}: missing calibration fields {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def efficient_batch_tokens(self) -> int:
        """Tokens per step at which dense work equals the fixed overhead (50% efficiency)."""
        return max(1, math.ceil(self.step_overhead_s / self.per_token_s))

    def step_s(self, batch_tokens: int, kv_bytes: int, exchange_bytes: int) -> float:
        return self.compute_s(batch_tokens, kv_bytes) + self.exchange_s(exchange_bytes)

    def compute_s(self, batch_tokens: float, kv_bytes: float) -> float:
        """One instance's own work in a step with a batch: `a + b*tokens + c*kv_bytes`."""
        return (self.step_overhead_s + self.per_token_s * batch_tokens
                + self.per_kv_byte_s * kv_bytes)

    def exchange_s(self, exchange_bytes: float) -> float:
        """What exchanging `exchange_bytes` adds to a step (`e + d*bytes`; 0 for none)."""
        if not exchange_bytes:
            return 0.0
        return self.exchange_step_s + self.per_exchange_byte_s * exchange_bytes

    def cluster_step_s(self, compute_s: Sequence[float], exchange_s: float = 0.0) -> float:
        """A lockstep step: the sync, the `compute_s` of the instances with a batch as the
        hardware runs them, and the exchange of the slowest exchanging instance. A step in which
        nobody computes still costs the sync (`a` for a calibration without one)."""
        sync = self.sync_step_s
        if not compute_s:
            return (sync or self.step_overhead_s) + exchange_s
        slowest = max(compute_s)
        if self.parallel_instances:
            slowest = max(slowest, sum(compute_s) / self.parallel_instances)
        return sync + slowest + exchange_s
