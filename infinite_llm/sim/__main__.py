"""Pooled vs static on clusters of several sizes: a table on stdout and PNG plots.

    python -m infinite_llm.sim --instances 8 32 128 1024 \
        --trace benchmarks/traces/mixed_small.jsonl --trace-instances 8 \
        --calibration infinite_llm/sim/calibration_cpu_tiny.json --plots docs

With `--trace`, the trace is sized for `--trace-instances` and tiled to each cluster size, so the
load per instance stays the same; without it a trace is generated per size from `--per-instance`
requests and `--rate-per-instance` arrivals per second per instance.

`--lockstep` runs the cluster the way the engine does (`infinite_llm.sim.lockstep`: all instances
step together, each on the engine's scheduler, with the calibration's per-step sync and shared
cores); without it every instance steps at its own pace, as on one device each.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
from collections.abc import Sequence
from dataclasses import replace

from infinite_llm.sim import trace as tr
from infinite_llm.sim.cluster import MODES, SimConfig, simulate
from infinite_llm.sim.cost import DEFAULT_CALIBRATION, CostModel
from infinite_llm.sim.lockstep import simulate_lockstep
from infinite_llm.sim.report import memory_table, metrics, plot, table

logger = logging.getLogger(__name__)


def _trace_for(args: argparse.Namespace, instances: int) -> list[tr.TraceRequest]:
    if args.trace:
        base = tr.load(args.trace)
        copies = max(1, round(instances / args.trace_instances))
        return tr.tile(base, copies)
    return tr.generate(tr.TraceSpec(num=args.per_instance * instances,
                                    rate=args.rate_per_instance * instances, seed=args.seed,
                                    long_frac=args.long_frac))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, nargs="+", default=[8, 32, 128, 1024])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--trace", help="JSONL trace (see infinite_llm.sim.trace)")
    p.add_argument("--trace-instances", type=int, default=8,
                   help="cluster size the trace is sized for")
    p.add_argument("--per-instance", type=int, default=25, help="generated: requests/instance")
    p.add_argument("--rate-per-instance", type=float, default=4.0,
                   help="generated: arrivals per second per instance")
    p.add_argument("--long-frac", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration", default=str(DEFAULT_CALIBRATION))
    p.add_argument("--blocks", type=int, default=48, help="KV blocks per instance")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batched-tokens", type=int, default=256)
    p.add_argument("--max-seqs", type=int, default=32)
    p.add_argument("--plan-interval", type=float, default=0.02, help="seconds between plans")
    p.add_argument("--lockstep", action="store_true",
                   help="step all instances together, each on the engine's scheduler")
    p.add_argument("--lend-to-running", action=argparse.BooleanOptionalAction, default=True,
                   help="lease to instances that have requests running (the engine on CPU "
                        "doesn't: GManagerConfig.lend_to_running)")
    p.add_argument("--exchange-scale", type=float, default=1.0,
                   help="what-if: multiply the calibration's exchange costs (d and e)")
    p.add_argument("--plots", default="docs", help="folder for PNGs ('' for none)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cost = CostModel.from_json(a.calibration)
    if a.exchange_scale != 1.0:
        cost = replace(cost, per_exchange_byte_s=cost.per_exchange_byte_s * a.exchange_scale,
                       exchange_step_s=cost.exchange_step_s * a.exchange_scale)
        print(f"what-if: exchange costs x {a.exchange_scale:g} (not a measurement)")
    print(f"host: {platform.machine()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}")
    print(f"calibration: {a.calibration} ({cost.hardware}; {cost.model}); "
          f"efficient batch {cost.efficient_batch_tokens()} tokens"
          + (f"; lockstep, sync {cost.sync_step_s * 1e3:.1f} ms per step" if a.lockstep else ""))
    print(f"instance: {a.blocks} blocks x {a.block_size} tokens, budget {a.max_batched_tokens} "
          f"tokens, {a.max_seqs} seqs; plan every {a.plan_interval * 1e3:.0f} ms")
    engine_rules = {}
    if a.lockstep:  # the gManager as the engine configures it
        engine_rules = dict(efficient_batch_tokens=a.max_batched_tokens, reserve_blocks=0)
    rows = []
    for n in a.instances:
        trace = _trace_for(a, n)
        for mode in a.modes:
            cfg = SimConfig(num_instances=n, mode=mode, blocks_per_instance=a.blocks,
                            block_size=a.block_size, max_batched_tokens=a.max_batched_tokens,
                            max_num_seqs=a.max_seqs, plan_interval_s=a.plan_interval,
                            lend_to_running=a.lend_to_running, **engine_rules)
            m = metrics((simulate_lockstep if a.lockstep else simulate)(cfg, cost, trace))
            logger.info("%d instances %s: %d requests in %.1f s wall", n, mode, m.requests,
                        m.wall_s)
            rows.append(m)
    print(table(rows), flush=True)
    if a.lockstep:
        print(memory_table(rows), flush=True)
    if a.plots:
        src = a.trace or f"generated {a.per_instance}/instance at {a.rate_per_instance}/s/instance"
        for path in plot(rows, a.plots, title=f"pooled vs static, trace: {src}; "
                         f"{a.blocks}x{a.block_size}-token KV per instance"):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
