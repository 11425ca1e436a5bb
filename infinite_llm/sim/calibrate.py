"""Measure the cost model's coefficients on the real engine and write a calibration JSON.

    python -m infinite_llm.sim.calibrate --tiny --instances 4 \
        --out infinite_llm/sim/calibration_cpu_tiny.json

Why on the engine and in the cluster's own shape: the simulator is only as good as its step
times, and on a CPU the instances of one engine are processes sharing the cores and stepping in
lockstep. So the probes run on an N-instance engine like the one the simulator stands for, and a
sample is one timed `engine.step()`, which `CostModel.cluster_step_s` (used by
`infinite_llm.sim.lockstep`) must explain.

Probes add requests at once and time every step until they finish:
1. `static` engine: decode batches of 1..k requests per instance at short and long contexts,
   prefills of 64..~700 tokens per instance, and single requests (only one instance computes:
   this separates the per-instance work, which shares the cores, from the per-step sync).
2. `pooled` engine: the same requests, but once their first chunk is computed each is migrated
   (`engine.migrate`) to the next instance, so their later prefill chunks and their decodes send
   queries to the instance holding their KV (1 to 256 exchanged tokens per step).

A step's features come from the heartbeats around it, per instance: batch tokens, KV held (own
and hosted blocks x block size) and, for an instance with KV elsewhere, its batch tokens as
exchanged ones. Steps with equal features are pooled into their median (a shared machine has
stalls no feature explains). For each candidate number of instances computing at once (on a CPU
shared by more instances than cores: from 1 to the core count), the linear model

    step_s = sync + [a, b, c] . (the busiest instance's (1, tokens, kv_bytes), or the sums over
             busy instances / parallel if that is more) + e*[exchange] + d*exchange_bytes

is fitted by least squares weighted by the number of steps, with non-negative coefficients (which
branch each step takes is decided from the previous fit, three times over); the candidate with the
smallest residual is kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from infinite_llm.sampling import SamplingParams
from infinite_llm.sim.cost import CostModel
from infinite_llm.sim.replay import prompt_ids

if TYPE_CHECKING:
    from infinite_llm.cluster.gmanager import Heartbeat
    from infinite_llm.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

FIELD_DOCS = {
    "step_overhead_s": "a: fixed work of an instance with a batch in a step (Python, "
                       "launches, sampling), s",
    "per_token_s": "b: per batch token of an instance (dense layers, prefill attention), s",
    "per_kv_byte_s": "c: attention per byte of KV held by an instance with a batch, s",
    "per_exchange_byte_s": "d: per byte of queries and partials crossing instances, s",
    "exchange_step_s": "e: fixed latency of a step that exchanges at all (2 all_to_alls per "
                       "layer), s",
    "kv_bytes_per_token": "K+V bytes of one token over all layers",
    "exchange_bytes_per_token": "bytes per query token per remote instance, all layers: query "
                                "out + float32 partial output and log-sum-exp back",
    "sync_step_s": "fixed cost of a lockstep step of the cluster (plan, broadcast, gather), s",
    "parallel_instances": "instances computing at once where measured (0: all)",
}


@dataclass(frozen=True, slots=True)
class StepSample:
    """One timed engine step and, per instance, what it computed (from the heartbeats)."""

    step_s: float
    tokens: tuple[int, ...]  # batch tokens
    kv_tokens: tuple[int, ...]  # KV tokens held (own and hosted blocks x block size)
    exchange_tokens: tuple[int, ...]  # batch tokens of an instance with KV elsewhere, else 0
    probe: str


@dataclass(frozen=True, slots=True)
class Probe:
    """`requests` identical requests per instance (`spread`) or in all; `migrate` moves each
    one's KV to the next instance once its first chunk is computed."""

    name: str
    requests: int
    prompt_len: int
    output_len: int
    migrate: bool = False
    spread: bool = True


def probes_for(num_blocks: int, block_size: int, migrate: bool) -> list[Probe]:
    """Probes whose requests fit an instance of `num_blocks` blocks all at once (after a
    migration an instance holds the tails of its requests and the heads of its neighbour's,
    no more than that)."""
    capacity_tokens = num_blocks * block_size
    ctx = min(600, int(0.3 * capacity_tokens))
    prefill = min(1024, int(0.7 * capacity_tokens))
    k = max(1, min(12, capacity_tokens // 64))
    tag = "exchange" if migrate else "local"
    out = [Probe(f"{tag}-decode-{n}x24", n, 24, 24, migrate) for n in sorted({1, 3, k})]
    out += [Probe(f"{tag}-context-2x{ctx}", 2, ctx, 24, migrate),
            Probe(f"{tag}-prefill-4x64", 4, 64, 8, migrate),
            Probe(f"{tag}-prefill-3x160", 3, 160, 8, migrate),
            Probe(f"{tag}-single-prefill-{prefill}", 1, prefill, 8, migrate, spread=False),
            Probe(f"{tag}-single-decode-{ctx}", 1, ctx, 24, migrate, spread=False)]
    return [p for p in out
            if p.requests * -(-(p.prompt_len + p.output_len) // block_size) < num_blocks]


def _held(hb: Heartbeat) -> int:
    return hb.own_blocks + hb.lent_blocks


def timed_step(engine: LLMEngine, name: str) -> StepSample:
    """Run one step and describe it."""
    before = engine.heartbeats
    t0 = time.perf_counter()
    engine.step()
    step_s = time.perf_counter() - t0
    after = engine.heartbeats
    bs = engine.config.cache.block_size
    return StepSample(
        step_s, tuple(h.batch_tokens for h in after),
        tuple(max(_held(b), _held(a)) * bs for b, a in zip(before, after)),
        tuple(h.batch_tokens if h.borrowed_blocks > 0 else 0 for h in after), name)


def run_probe(engine: LLMEngine, probe: Probe, seed: int = 0) -> list[StepSample]:
    """Add the probe's requests at once and time every step until they finish."""
    n = engine.config.cluster.num_instances
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=probe.output_len, ignore_eos=True)
    for j in range(probe.requests * (n if probe.spread else 1)):
        rid = f"{probe.name}/{j}"
        engine.add_request(prompt_ids(rid, probe.prompt_len, vocab, seed), params, rid)
    samples = []
    if probe.migrate and n > 1:
        samples.append(timed_step(engine, probe.name + "/first-chunk"))
        for h in engine.heartbeats:
            for rid, _ in h.request_blocks:
                engine.migrate(rid, (h.instance + 1) % n)
        samples.append(timed_step(engine, probe.name + "/migration"))
    while engine.has_unfinished_requests():
        samples.append(timed_step(engine, probe.name))
    return samples


def measure(engine: LLMEngine, seed: int = 0) -> list[StepSample]:
    """Every probe that fits this engine: local ones, and on a pooled cluster exchange ones."""
    cfg = engine.config
    num_blocks = min(h.total_blocks for h in engine.heartbeats)
    migrate = cfg.cluster.kv_mode == "pooled" and cfg.cluster.num_instances > 1
    run_probe(engine, Probe("warmup", 2, 32, 4), seed)
    samples: list[StepSample] = []
    for probe in probes_for(num_blocks, cfg.cache.block_size, migrate):
        got = run_probe(engine, probe, seed)
        logger.info("probe %s: %d steps, median %.1f ms", probe.name, len(got),
                    1e3 * float(np.median([s.step_s for s in got])))
        samples += got
    return samples


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares with coefficients >= 0: drop the most negative column, refit."""
    sw = np.sqrt(w)[:, None]
    active = [j for j in range(x.shape[1]) if np.any(x[:, j])]
    coef = np.zeros(x.shape[1])
    while active:
        sol = np.linalg.lstsq(x[:, active] * sw, y * sw[:, 0], rcond=None)[0]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


def _design(groups: list[np.ndarray], coef: np.ndarray, parallel: float,
            kv_bytes: int, exchange_bytes: int) -> np.ndarray:
    """One row per group: [sync, a, b, c, e, d] features, each group's compute branch chosen
    with `coef` (the busiest instance, or the busy ones' sums / parallel if that costs more)."""
    rows = []
    for g in groups:  # g: [tokens..., kv..., exchange...] of one group (mean over its steps)
        n = len(g) // 3
        tok, kv, ex = g[:n], g[n:2 * n] * kv_bytes, g[2 * n:]
        busy = (tok > 0).astype(float)
        per = np.stack([busy, tok, kv * busy], axis=1)  # [n, 3]: a, b, c features per instance
        weights = coef[1:4] if coef.any() else np.array([0.0, 1.0, 0.0])  # first: by tokens
        work = per @ weights
        i = int(np.argmax(work))
        compute = per[i]
        if parallel and per.sum(0) @ weights / parallel > work[i]:
            compute = per.sum(0) / parallel
        rows.append([1.0, *compute, float(ex.max() > 0), ex.max() * exchange_bytes])
    return np.array(rows)


def fit(samples: Sequence[StepSample], kv_bytes_per_token: int, exchange_bytes_per_token: int,
        max_parallel: int = 0, hardware: str = "", model: str = "",
        kv_bucket_tokens: int = 64) -> tuple[CostModel, dict[str, float]]:
    """The cost model that best explains the samples, and statistics of the fit.

    `max_parallel`: the most instances that can compute at once (the CPU's cores when the
    instances share them; 0 when each has its own device, so none is fitted)."""
    buckets: dict[tuple, list[StepSample]] = defaultdict(list)
    for s in samples:
        key = (s.tokens, tuple(k // kv_bucket_tokens for k in s.kv_tokens), s.exchange_tokens)
        buckets[key].append(s)
    groups = [np.concatenate([np.mean([s.tokens for s in b], axis=0),
                              np.mean([s.kv_tokens for s in b], axis=0),
                              np.mean([s.exchange_tokens for s in b], axis=0)])
              for b in buckets.values()]
    y = np.array([float(np.median([s.step_s for s in b])) for b in buckets.values()])
    w = np.array([len(b) for b in buckets.values()], dtype=float)
    candidates = [0.0] if not max_parallel else list(np.arange(1.0, max_parallel + 0.01, 0.25))
    best: tuple[float, float, np.ndarray] | None = None
    for parallel in candidates:
        coef = np.zeros(6)
        for _ in range(3):
            x = _design(groups, coef, parallel, kv_bytes_per_token, exchange_bytes_per_token)
            coef = _nonneg_lstsq(x, y, w)
        sse = float(np.sum(w * (y - x @ coef) ** 2))
        if best is None or sse < best[0]:
            best = (sse, parallel, coef)
    assert best is not None
    sse, parallel, coef = best
    mean = np.average(y, weights=w)
    r2 = 1 - sse / max(float(np.sum(w * (y - mean) ** 2)), 1e-18)
    cost = CostModel(sync_step_s=float(coef[0]), step_overhead_s=float(coef[1]),
                     per_token_s=max(float(coef[2]), 1e-9), per_kv_byte_s=float(coef[3]),
                     exchange_step_s=float(coef[4]), per_exchange_byte_s=float(coef[5]),
                     kv_bytes_per_token=kv_bytes_per_token,
                     exchange_bytes_per_token=exchange_bytes_per_token,
                     parallel_instances=float(parallel), hardware=hardware, model=model)
    stats = {"steps": len(samples), "groups": len(groups), "weighted_r2": round(r2, 3),
             "exchange_steps": sum(max(s.exchange_tokens) > 0 for s in samples),
             "median_step_s": round(float(np.median([s.step_s for s in samples])), 4)}
    return cost, stats


def bytes_per_token(engine: LLMEngine) -> tuple[int, int]:
    """(KV bytes per token, exchange bytes per query token per remote instance), all layers."""
    mc = engine.model_config
    item = engine.config.load.torch_dtype.itemsize  # the KV cache's dtype is the model's
    kv = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * item
    exchange = mc.num_layers * mc.num_heads * (mc.head_dim * item + (mc.head_dim + 1) * 4)
    return kv, exchange


def max_parallel(engine: LLMEngine) -> int:
    """The most instances that can compute at once: on a CPU, each gets cores // N threads (at
    least 1), so the cores bound them; 0 (all, nothing to fit) when that is all of them."""
    n = engine.config.cluster.num_instances
    if engine.config.load.torch_device.type != "cpu" or n == 1:
        return 0
    cores = os.cpu_count() or 1
    at_once = cores // max(1, cores // n)
    return 0 if at_once >= n else at_once


def hardware_line(num_instances: int, device: str = "cpu") -> str:
    """The CPU, its cores and how many instance processes share them; on CUDA, the GPUs too."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                 .splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    if device.startswith("cuda"):
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        where = f"{num_instances} instances on {len(gpus)} GPUs ({', '.join(sorted(set(gpus)))})"
        return (f"{where}, {cpu}, {os.cpu_count()} CPU cores; torch {torch.__version__}, "
                f"Python {platform.python_version()}")
    return (f"{cpu}, {os.cpu_count()} CPU cores shared by {num_instances} instance processes "
            f"(gloo over loopback); torch {torch.__version__}, Python "
            f"{platform.python_version()}")


def calibrate(model: str, num_instances: int = 4, *, num_kv_blocks: int = 64,
              block_size: int = 16, max_num_batched_tokens: int = 256, max_num_seqs: int = 32,
              model_name: str = "", seed: int = 0
              ) -> tuple[CostModel, dict[str, float], list[StepSample]]:
    """Probe a static and then a pooled N-instance engine of `model`; fit the cost model."""
    from infinite_llm.entrypoints.api import LLM

    samples: list[StepSample] = []
    kv_bytes = exchange_bytes = parallel = 0
    for mode in ("static", "pooled") if num_instances > 1 else ("static",):
        llm = LLM(model, num_instances=num_instances, kv_mode=mode, num_kv_blocks=num_kv_blocks,
                  block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                  max_num_seqs=max_num_seqs, worker_timeout_s=300)
        try:
            kv_bytes, exchange_bytes = bytes_per_token(llm.engine)
            parallel = max_parallel(llm.engine)
            samples += measure(llm.engine, seed)
        finally:
            llm.engine.shutdown()
    cost, stats = fit(samples, kv_bytes, exchange_bytes, parallel, hardware_line(num_instances),
                      model_name or model)
    return cost, stats, samples


def write(cost: CostModel, stats: dict[str, float], path: str | Path, note: str) -> None:
    data = {"_note": note, "_fields": FIELD_DOCS, "_fit": stats, **asdict(cost)}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    from infinite_llm.sim.tiny_model import describe, write_tiny_llama

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF folder or .gguf of the model to calibrate with")
    src.add_argument("--tiny", action="store_true",
                     help="write the tiny random Llama (infinite_llm.sim.tiny_model) and use it")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--num-kv-blocks", type=int, default=64, help="per instance")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batched-tokens", type=int, default=256)
    p.add_argument("--max-seqs", type=int, default=32)
    p.add_argument("--out", required=True, help="calibration JSON to write")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_llama(Path(tmp) / "tiny")) if a.tiny else a.model
        cost, stats, _ = calibrate(model, a.instances, num_kv_blocks=a.num_kv_blocks,
                                   block_size=a.block_size,
                                   max_num_batched_tokens=a.max_batched_tokens,
                                   max_num_seqs=a.max_seqs,
                                   model_name=describe() if a.tiny else a.model)
    args = " ".join(sys.argv[1:] if argv is None else argv)
    note = (f"Measured by `python -m infinite_llm.sim.calibrate {args}` on "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')} ({time.perf_counter() - start:.0f} s): "
            f"timed engine.step() of a {a.instances}-instance engine ({a.num_kv_blocks} blocks "
            f"of {a.block_size} tokens per instance, budget {a.max_batched_tokens} tokens), "
            "static probes then pooled ones with migrated KV, fitted by least squares (see "
            "infinite_llm/sim/calibrate.py). The CPU was shared with other work, so absolute "
            "times are noisy; the simulator's ratios depend on their proportions.")
    write(cost, stats, a.out, note)
    print(json.dumps({**asdict(cost), "fit": stats}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
