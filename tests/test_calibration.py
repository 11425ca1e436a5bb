"""The lockstep simulator runs the engine's schedule step for step, and, calibrated on this
machine from a small real run, predicts that run's pooled/static throughput ratio within 25%.

Step for step: a burst of chats, prompts longer than a chunk and documents longer than one
instance, on 2 and 3 CPU instances with pools small enough to preempt and to lease (the second
with the GPU policy, leases to running instances). The engine's clock plays no part in a
burst's schedule, so the simulator, which schedules with the engine's own scheduler and
places blocks as its rManager does, must take the same steps, preempt as often, exchange in
the same steps and finish the same requests in each step.

The ratio:

A tiny random Llama on 3 CPU instances (more processes than cores, as in the benchmark), pools of
768 tokens, a trace where long requests need more than half an instance among short chats. The
first engine of each mode runs the calibration probes (`calibrate.measure`) before replaying the
trace; the probes of both modes are fitted into one cost model, and the lockstep simulator (the
engine's clock and scheduling rules, `infinite_llm.sim.lockstep`) replays the same trace in the
same configuration. About 90 s on 2 cores.

Made to survive a shared, noisy machine:
- the whole trace arrives at once, so the engine's schedule doesn't depend on the clock (the
  same steps every run) and only step durations are noisy;
- the modes run twice, pooled-static-static-pooled, and each mode's throughput is taken over both
  of its runs, so a machine getting busier or quieter during the test weighs on both modes alike.
The assertion is on output tokens per second; output tokens per step, which no clock touches,
are printed beside it as a cross-check.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import groupby
from pathlib import Path

import pytest

from infinite_llm import LLM
from infinite_llm.cluster.gmanager import GManager
from infinite_llm.sim import trace as tr
from infinite_llm.sim.calibrate import StepSample, bytes_per_token, fit, max_parallel, measure
from infinite_llm.sim.cost import CostModel
from infinite_llm.sim.lockstep import LockstepSimulator, engine_sim_config, simulate_lockstep
from infinite_llm.sim.replay import Replay, replay, run_metrics
from infinite_llm.sim.report import metrics
from infinite_llm.sim.tiny_model import write_tiny_llama

pytestmark = pytest.mark.slow

OPTIONS = dict(num_instances=3, num_kv_blocks=48, block_size=16, max_num_batched_tokens=256,
               max_num_seqs=32, device="cpu", worker_timeout_s=120)
SPEC = tr.TraceSpec(num=60, rate=30.0, seed=0, long_frac=0.3, short_prompt=(16, 64),
                    long_prompt=(420, 700), output=(8, 64))
ORDER = ("pooled", "static", "static", "pooled")


def burst(spec: tr.TraceSpec) -> list[tr.TraceRequest]:
    """The generated requests, all arriving at t=0."""
    return [tr.TraceRequest(r.request_id, 0.0, r.prompt_len, r.output_len)
            for r in tr.generate(spec)]


def throughput(runs: list[Replay]) -> tuple[float, float]:
    """(output tokens/s, output tokens per step) over several runs of one mode."""
    ms = [run_metrics(r) for r in runs]
    assert all(m.finished == m.requests and m.rejected == 0 for m in ms)
    tokens = sum(m.output_tokens for m in ms)
    return tokens / sum(m.span_s for m in ms), tokens / sum(m.num_steps for m in ms)


def finish_groups(finishes: list[tuple[float, str]]) -> list[set[str]]:
    """Request ids by the step that finished them, in order (a step's finishes share a time)."""
    return [{rid for _, rid in group} for _, group in groupby(sorted(finishes), lambda f: f[0])]


@pytest.mark.parametrize(("instances", "lend_to_running"), [(2, False), (3, True)])
def test_lockstep_simulator_takes_the_engines_steps(tmp_path: Path, instances: int,
                                                   lend_to_running: bool) -> None:
    model = str(write_tiny_llama(tmp_path / "tiny"))
    spec = tr.TraceSpec(num=12, rate=30.0, seed=0, long_frac=0.3, short_prompt=(8, 24),
                        long_prompt=(30, 50), output=(8, 30))
    trace = burst(spec) + [tr.TraceRequest(f"doc{i}", 0.0, 100 + 7 * i, 12)
                           for i in range(instances)]
    llm = LLM(model, num_instances=instances, num_kv_blocks=10, block_size=8,
              max_num_batched_tokens=32, max_num_seqs=8, device="cpu", worker_timeout_s=120)
    try:
        engine = llm.engine
        engine.gmanager = GManager(replace(engine.gmanager.config,
                                           lend_to_running=lend_to_running))
        run = replay(engine, trace, "pooled")
        config = engine.config
    finally:
        llm.engine.shutdown()
    cost = CostModel.from_json()
    sim = LockstepSimulator(replace(engine_sim_config(config, cost),
                                    lend_to_running=lend_to_running), cost, trace)
    result = sim.run()
    assert all(t.finish_s is not None for t in run.timings)
    assert result.num_preemptions == run.preemptions > 0
    assert result.exchange_steps == run.exchange_steps > 0
    assert result.num_steps == run.num_steps
    assert finish_groups([(r.finish_s, r.request_id) for r in sim.requests]) == \
        finish_groups([(t.finish_s, t.request_id) for t in run.timings])


def test_simulator_predicts_the_engines_pooled_over_static_ratio(tmp_path: Path) -> None:
    model = str(write_tiny_llama(tmp_path / "tiny"))
    trace = burst(SPEC)
    capacity = OPTIONS["num_kv_blocks"] * OPTIONS["block_size"]
    assert sum(r.prompt_len + r.output_len > capacity // 2 for r in trace) >= 10
    assert all(r.prompt_len + r.output_len <= capacity for r in trace)

    samples: list[StepSample] = []
    runs: dict[str, list[Replay]] = {"pooled": [], "static": []}
    configs = {}
    for i, mode in enumerate(ORDER):
        llm = LLM(model, kv_mode=mode, **OPTIONS)
        try:
            engine = llm.engine
            configs[mode] = engine.config
            kv_bytes, exchange_bytes = bytes_per_token(engine)
            parallel = max_parallel(engine)
            if i < 2:  # one calibration per mode: static probes, and pooled ones that exchange
                samples += measure(engine)
            runs[mode].append(replay(engine, trace, mode))
        finally:
            llm.engine.shutdown()
    cost, stats = fit(samples, kv_bytes, exchange_bytes, parallel)

    real = {mode: throughput(r) for mode, r in runs.items()}
    sim = {}
    for mode, cfg in configs.items():
        result = simulate_lockstep(engine_sim_config(cfg, cost), cost, trace)
        m = metrics(result)
        assert m.finished == m.requests
        sim[mode] = (m.output_tokens_per_s, sum(r.output_len for r in trace) / result.num_steps)
    real_ratio = real["pooled"][0] / real["static"][0]
    sim_ratio = sim["pooled"][0] / sim["static"][0]
    print(f"\ncost model: {cost}\nfit: {stats}")
    for mode in ("pooled", "static"):
        print(f"{mode}: real {real[mode][0]:.1f} tok/s, {real[mode][1]:.2f} tok/step; "
              f"simulated {sim[mode][0]:.1f} tok/s, {sim[mode][1]:.2f} tok/step")
    print(f"pooled/static: real {real_ratio:.3f}, simulated {sim_ratio:.3f}; per step: real "
          f"{real['pooled'][1] / real['static'][1]:.3f}, simulated "
          f"{sim['pooled'][1] / sim['static'][1]:.3f}")
    assert abs(sim_ratio / real_ratio - 1) <= 0.25
