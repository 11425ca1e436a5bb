"""Mixed-length request traces: seeded generation, JSONL files, and tiling to a larger cluster.

A trace is two classes of requests arriving as a Poisson process: short chats and long documents
(`long_frac` of them). Within a class, prompt and output lengths are log-uniform between their
bounds, so small values are as likely per octave as large ones (a Zipf-like tail). The mix is what
strands memory: one long document fills most of an instance while short chats want many seats.
Lengths are in tokens; the defaults fit a tiny CPU model whose instances hold ~1K tokens of KV.

One JSON object per line: {"request_id": str, "arrival_s": float, "prompt_len": int,
"output_len": int}, sorted by arrival.

    python -m infinite_llm.sim.trace --num 200 --rate 32 --seed 0 --long-frac 0.1 \
        --out benchmarks/traces/mixed_small.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """What to generate. `long_scale` stretches the long class (e.g. 16 for 4K-16K -> 64K-256K)."""

    num: int = 200
    rate: float = 32.0  # requests per second, Poisson
    seed: int = 0
    long_frac: float = 0.1
    short_prompt: tuple[int, int] = (8, 64)
    long_prompt: tuple[int, int] = (256, 1024)
    output: tuple[int, int] = (8, 128)
    long_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.num < 0 or self.rate <= 0 or not 0.0 <= self.long_frac <= 1.0:
            raise ValueError(f"bad trace spec: num={self.num} rate={self.rate} "
                             f"long_frac={self.long_frac}")
        for name in ("short_prompt", "long_prompt", "output"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"TraceSpec.{name} must be 1 <= min <= max, got {(lo, hi)}")


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def generate(spec: TraceSpec) -> list[TraceRequest]:
    rng = random.Random(spec.seed)
    lo, hi = (max(1, round(x * spec.long_scale)) for x in spec.long_prompt)
    t = 0.0
    out = []
    for i in range(spec.num):
        t += rng.expovariate(spec.rate)
        is_long = rng.random() < spec.long_frac
        prompt = _log_uniform(rng, lo, hi) if is_long else _log_uniform(rng, *spec.short_prompt)
        output = _log_uniform(rng, *spec.output)
        kind = "long" if is_long else "chat"
        out.append(TraceRequest(f"{kind}-{i}", round(t, 6), prompt, output))
    return out


def save(requests: Iterable[TraceRequest], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(asdict(r)) + "\n")


def load(path: str | Path) -> list[TraceRequest]:
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                r = TraceRequest(str(d["request_id"]), float(d["arrival_s"]),
                                 int(d["prompt_len"]), int(d["output_len"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a trace line ({e})") from e
            if r.prompt_len < 1 or r.output_len < 1:
                raise ValueError(f"{path}:{lineno}: lengths must be >= 1")
            out.append(r)
    return sorted(out, key=lambda r: r.arrival_s)


def tile(requests: Sequence[TraceRequest], copies: int) -> list[TraceRequest]:
    """`copies` interleaved copies of a trace: the same load per instance on a larger cluster.

    Copy c is shifted by c/copies of the mean gap between arrivals, so copies don't arrive in
    lockstep, and its ids get a `/c` suffix.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if copies == 1 or not requests:
        return list(requests)
    gap = (requests[-1].arrival_s - requests[0].arrival_s) / max(1, len(requests) - 1)
    out = [TraceRequest(f"{r.request_id}/{c}", r.arrival_s + c * gap / copies, r.prompt_len,
                        r.output_len) for c in range(copies) for r in requests]
    return sorted(out, key=lambda r: r.arrival_s)


def main(argv: Sequence[str] | None = None) -> None:
    d = TraceSpec()
    p = argparse.ArgumentParser(description="Generate a mixed short/long request trace (JSONL).")
    p.add_argument("--num", type=int, default=d.num)
    p.add_argument("--rate", type=float, default=d.rate, help="arrivals per second (Poisson)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--long-frac", type=float, default=d.long_frac)
    p.add_argument("--short", type=int, nargs=2, default=d.short_prompt, metavar=("MIN", "MAX"))
    p.add_argument("--long", type=int, nargs=2, default=d.long_prompt, metavar=("MIN", "MAX"))
    p.add_argument("--output", type=int, nargs=2, default=d.output, metavar=("MIN", "MAX"))
    p.add_argument("--long-scale", type=float, default=d.long_scale)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    spec = TraceSpec(a.num, a.rate, a.seed, a.long_frac, tuple(a.short), tuple(a.long),
                     tuple(a.output), a.long_scale)
    requests = generate(spec)
    save(requests, a.out)
    n_long = sum(r.request_id.startswith("long") for r in requests)
    print(f"wrote {len(requests)} requests ({n_long} long) over {requests[-1].arrival_s:.1f} s "
          f"to {a.out}" if requests else f"wrote an empty trace to {a.out}")


if __name__ == "__main__":
    main()
