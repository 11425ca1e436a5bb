"""Pooled vs static KV on the same instances, same trace, same run: does pooling pay?

The trace (JSONL: request_id, arrival_s, prompt_len, output_len) is replayed on the real engine
with N instances, first in one mode, then (after `shutdown()`) in the other: random prompt token
ids, greedy, `ignore_eos`, `max_tokens=output_len`, arrivals honoured on the wall clock
(`infinite_llm.sim.replay`). Static mode rejects what one instance can't hold (counted as
rejected). Prints the hardware, then per mode output tokens/s, requests/s, TTFT and TPOT p50/p99,
rejections and wall time, with the clock-free cross-checks (steps, output tokens per step,
preemptions, steps that exchanged, free KV while requests waited), then the pooled/static ratios,
and what the lockstep simulator predicts for the same trace with the given calibration, with
its own clock-free cross-checks (and where the free memory sat: beside a queue whose head
didn't fit).

The default trace, `benchmarks/traces/stranding_4x1k.jsonl`, is made for 4 instances of 64
blocks x 16 tokens (1024 tokens each): 17 long documents that each need 62-91% of one instance,
among short chats that keep arriving faster than the cluster serves them. It was made with

    python -m infinite_llm.sim.trace --num 160 --rate 16 --seed 1 --long-frac 0.12 \
        --short 16 96 --long 560 860 --output 16 128 \
        --out benchmarks/traces/stranding_4x1k.jsonl

`benchmarks/traces/halfplus_4x1k.jsonl` (`--trace`) is the trace where stranding is all there
is: every request needs 53-65% of one instance, so a static instance holds one at a time
(benchmarks/traces/README.md says how each trace was made and why).

Run (the tiny random Llama by default; `--model` for a real checkpoint):

    python benchmarks/pooled_vs_static.py --out benchmarks/results/pooled_vs_static_cpu.json

Results over time, and what they decided (no lending to running instances on CPU):
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from infinite_llm import LLM  # noqa: E402
from infinite_llm.cluster.gmanager import GManager  # noqa: E402
from infinite_llm.config import EngineConfig  # noqa: E402
from infinite_llm.sim import trace as tr  # noqa: E402
from infinite_llm.sim.calibrate import hardware_line  # noqa: E402
from infinite_llm.sim.cost import DEFAULT_CALIBRATION, CostModel  # noqa: E402
from infinite_llm.sim.lockstep import engine_sim_config, simulate_lockstep  # noqa: E402
from infinite_llm.sim.replay import RunMetrics, replay, run_metrics  # noqa: E402
from infinite_llm.sim.report import metrics as sim_metrics  # noqa: E402
from infinite_llm.sim.tiny_model import describe, write_tiny_llama  # noqa: E402

DEFAULT_TRACE = ROOT / "benchmarks" / "traces" / "stranding_4x1k.jsonl"
MODES = ("pooled", "static")


def engine_options(a: argparse.Namespace, mode: str) -> dict:
    return dict(num_instances=a.instances, kv_mode=mode, num_kv_blocks=a.num_kv_blocks,
                block_size=a.block_size, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens, device=a.device,
                worker_timeout_s=600)


def line(m: RunMetrics) -> str:
    return (f"{m.mode:<7} {m.output_tokens_per_s:>9.1f} {m.requests_per_s:>7.2f} "
            f"{m.ttft_p50_s:>8.2f}s {m.ttft_p99_s:>8.2f}s {m.tpot_p50_s * 1e3:>7.0f}ms "
            f"{m.tpot_p99_s * 1e3:>7.0f}ms {m.rejected:>5} {m.wall_s:>7.1f}s | {m.num_steps:>6} "
            f"{m.output_tokens_per_step:>7.2f} {m.preemptions:>7} {m.exchange_steps:>6} "
            f"{m.free_while_waiting:>8.0%}")


HEADER = (f"{'mode':<7} {'out tok/s':>9} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9} {'rej':>5} {'wall':>8} | {'steps':>6} "
          f"{'tok/step':>7} {'preempt':>7} {'exch':>6} {'free/wait':>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF folder or .gguf (default: --tiny)")
    src.add_argument("--tiny", action="store_true",
                     help="a tiny random Llama written to a temp dir (the default)")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--num-kv-blocks", type=int, default=64, help="per instance")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="run order (one engine at a time)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply arrival times (>1 spreads the trace out)")
    p.add_argument("--calibration", default=str(DEFAULT_CALIBRATION),
                   help="cost model for the simulator's prediction ('' for none)")
    p.add_argument("--lend-to-running", action="store_true",
                   help="lease to instances with requests running, as on GPUs (on CPU the "
                        "engine doesn't: GManagerConfig.lend_to_running); measures what "
                        "lending costs here")
    p.add_argument("--device", default="cpu",
                   help="cpu (gloo), or cuda: one GPU per instance over NCCL (run on 2 H200s: "
                   "benchmarks/results/multi_gpu_h200x2.txt)")
    p.add_argument("--seed", type=int, default=0, help="prompt token ids")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trace = tr.load(a.trace)
    if a.time_scale != 1.0:
        trace = [tr.TraceRequest(r.request_id, r.arrival_s * a.time_scale, r.prompt_len,
                                 r.output_len) for r in trace]
    capacity = a.num_kv_blocks * a.block_size
    need = [r.prompt_len + r.output_len for r in trace]
    print(f"hardware: {hardware_line(a.instances, a.device)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or str(write_tiny_llama(Path(tmp) / "tiny"))
        model_name = a.model or describe()
        print(f"model: {model_name}")
        print(f"cluster: {a.instances} instances x {a.num_kv_blocks} blocks x {a.block_size} "
              f"tokens ({capacity} tokens each), budget {a.max_num_batched_tokens} tokens, "
              f"{a.max_num_seqs} seqs")
        print(f"trace: {a.trace}: {len(trace)} requests over {trace[-1].arrival_s:.1f} s, "
              f"{sum(r.output_len for r in trace)} output tokens; "
              f"{sum(n > capacity // 2 for n in need)} need more than half an instance, "
              f"{sum(n > capacity for n in need)} more than one", flush=True)
        results: dict[str, RunMetrics] = {}
        for mode in a.modes:
            llm = LLM(model, **engine_options(a, mode))
            if a.lend_to_running:
                policy = llm.engine.gmanager.config
                llm.engine.gmanager = GManager(replace(policy, lend_to_running=True))
            try:
                run = replay(llm.engine, trace, mode, seed=a.seed)
            finally:
                llm.engine.shutdown()
            results[mode] = run_metrics(run)
            print(f"  {mode}: done in {run.wall_s:.1f} s", flush=True)
    print(HEADER)
    for m in results.values():
        print(line(m))
    ratios = {}
    if len(results) == 2:
        pooled, static = results["pooled"], results["static"]
        ratios = {k: getattr(pooled, k) / getattr(static, k) for k in
                  ("output_tokens_per_s", "requests_per_s", "output_tokens_per_step")}
        print(f"pooled / static: output tokens/s {ratios['output_tokens_per_s']:.2f}x, "
              f"requests/s {ratios['requests_per_s']:.2f}x (output tokens per step "
              f"{ratios['output_tokens_per_step']:.2f}x)")
    sim = {}
    if a.calibration:
        cost = CostModel.from_json(a.calibration)
        for mode in a.modes:
            cfg = engine_sim_config(EngineConfig.from_options(**engine_options(a, mode)), cost)
            cfg = replace(cfg, lend_to_running=cfg.lend_to_running or a.lend_to_running)
            sm = sim_metrics(simulate_lockstep(cfg, cost, trace))
            sim[mode] = asdict(sm)
            print(f"simulator {mode}: {sm.output_tokens_per_s:.1f} output tokens/s | "
                  f"{sm.steps} steps, {sm.output_tokens_per_step:.2f} tok/step, "
                  f"{sm.preemptions} preempt, {sm.exchange_steps} exch, "
                  f"{sm.free_while_waiting:.0%} free/wait ({sm.free_beside_queue:.0%} beside a "
                  f"queue), head blocked in {sm.blocked_share:.0%} of instance-steps")
        if len(sim) == 2:
            sr = sim["pooled"]["output_tokens_per_s"] / sim["static"]["output_tokens_per_s"]
            print(f"simulator (lockstep, {a.calibration}): pooled "
                  f"{sim['pooled']['output_tokens_per_s']:.1f}, static "
                  f"{sim['static']['output_tokens_per_s']:.1f} output tokens/s, ratio {sr:.2f}x")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({
            "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "hardware": hardware_line(a.instances, a.device), "model": model_name,
            "config": {k: v for k, v in vars(a).items() if k not in ("out",)},
            "results": {k: asdict(v) for k, v in results.items()}, "ratios": ratios,
            "simulator": sim}, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
