"""Replay a trace on the real engine, on a wall clock: the measurement the simulator predicts.

Each trace request becomes random prompt token ids (seeded by its id, so every mode sees the same
prompts), greedy, `ignore_eos`, `max_tokens=output_len`. Arrivals are honoured on the wall clock:
between steps, every request whose `arrival_s` has passed is added; an idle engine sleeps until
the next arrival. A `RequestError` at `add_request` (static mode: the prompt doesn't fit one
instance) counts the request as rejected; one whose output the engine capped to fit counts as
truncated. Metrics use the simulator's definitions (`infinite_llm.sim.report`) so a replay and a
simulation compare line for line.

Besides wall-clock times the replay counts, from the instances' heartbeats, engine steps and the
tokens they computed (which depend little on how busy the machine is, so they cross-check a
throughput ratio measured on a noisy machine), steps that exchanged queries between instances,
and how much KV memory sat free while requests waited for admission (memory stranded).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from infinite_llm.engine.engine import RequestError
from infinite_llm.sampling import SamplingParams
from infinite_llm.sim.report import percentile

if TYPE_CHECKING:
    from infinite_llm.cluster.gmanager import Heartbeat
    from infinite_llm.engine.engine import LLMEngine
    from infinite_llm.sim.trace import TraceRequest


@dataclass(slots=True)
class Timing:
    """One request's life on the wall clock, in seconds from the replay's start."""

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    rejected: bool = False
    num_output: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class Replay:
    """Everything one replay measured; `run_metrics` turns it into numbers."""

    mode: str
    num_instances: int
    timings: list[Timing]
    num_steps: int = 0
    step_tokens: int = 0  # tokens computed by all instances (prefill chunks and decodes)
    busy_s: float = 0.0  # time spent inside engine.step()
    wall_s: float = 0.0  # from the replay's start to the last finish
    preemptions: int = 0
    exchange_steps: int = 0  # steps in which an instance with KV elsewhere computed
    waiting_steps: int = 0  # steps after which some request waited for admission
    free_while_waiting: float = 0.0  # sum over those steps of the free fraction of all blocks
    step_s: list[float] = field(default_factory=list)  # every step's duration


@dataclass(frozen=True, slots=True)
class RunMetrics:
    """A replay's numbers, defined as `infinite_llm.sim.report.metrics` defines them."""

    mode: str
    requests: int
    finished: int
    rejected: int
    truncated: int  # finished with fewer tokens than asked (the engine capped max_tokens)
    output_tokens: int
    output_tokens_per_s: float  # output tokens of finished requests / (first arrival..last finish)
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    wall_s: float
    span_s: float
    num_steps: int
    step_tokens: int
    output_tokens_per_step: float  # the clock-free cross-check
    busy_s: float
    preemptions: int
    exchange_steps: int
    free_while_waiting: float  # mean free fraction of all KV blocks while requests waited


def prompt_ids(request_id: str, length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Random token ids for a request, the same in every mode and run (seeded by the id)."""
    rng = random.Random(f"{seed}/{request_id}")
    return [rng.randrange(3, vocab_size) for _ in range(length)]  # above bos/eos/pad


def replay(engine: LLMEngine, trace: Sequence[TraceRequest], mode: str, *,
           seed: int = 0) -> Replay:
    """Run the trace to the end on `engine` (already started in `mode`) and time every request."""
    reqs = sorted(trace, key=lambda r: r.arrival_s)
    timings = {r.request_id: Timing(r.request_id, r.arrival_s, r.prompt_len, r.output_len)
               for r in reqs}
    vocab = engine.model_config.vocab_size
    prompts = {r.request_id: prompt_ids(r.request_id, r.prompt_len, vocab, seed) for r in reqs}
    result = Replay(mode, engine.config.cluster.num_instances, list(timings.values()))
    preempted_before = engine.num_preemptions
    start = time.perf_counter()
    i = 0
    while i < len(reqs) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        if not engine.has_unfinished_requests() and i < len(reqs):
            wait = timings[reqs[i].request_id].arrival_s - now
            if wait > 0:
                time.sleep(wait)
                now = time.perf_counter() - start
        while i < len(reqs) and timings[reqs[i].request_id].arrival_s <= now:
            r = reqs[i]
            i += 1
            params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
            try:
                engine.add_request(prompts[r.request_id], params, r.request_id)
            except RequestError:
                timings[r.request_id].rejected = True
        if not engine.has_unfinished_requests():
            continue
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        result.step_s.append(t1 - t0)
        result.num_steps += 1
        _count_step(result, engine.heartbeats)
        for out in outputs:
            t = timings[out.request_id]
            t.num_output = len(out.outputs[0].token_ids)
            if t.first_token_s is None and t.num_output:
                t.first_token_s = t1 - start
            if out.finished:
                t.finish_s = t1 - start
                t.finish_reason = out.outputs[0].finish_reason
    result.busy_s = sum(result.step_s)
    result.wall_s = max((t.finish_s for t in result.timings if t.finish_s is not None),
                        default=0.0)
    result.preemptions = engine.num_preemptions - preempted_before
    return result


def _count_step(result: Replay, heartbeats: Sequence[Heartbeat]) -> None:
    result.step_tokens += sum(h.batch_tokens for h in heartbeats)
    result.exchange_steps += any(h.borrowed_blocks and h.batch_tokens for h in heartbeats)
    if any(h.num_waiting for h in heartbeats):
        result.waiting_steps += 1
        result.free_while_waiting += (sum(h.free_blocks for h in heartbeats)
                                      / sum(h.total_blocks for h in heartbeats))


def run_metrics(run: Replay) -> RunMetrics:
    """Throughput over the span from the first arrival to the last finish, as the simulator's
    report measures it; TTFT from arrival; TPOT over each request's tokens after the first."""
    ts = run.timings
    done = [t for t in ts if t.finish_s is not None and t.first_token_s is not None]
    start = min((t.arrival_s for t in ts), default=0.0)
    end = max((t.finish_s for t in done if t.finish_s is not None), default=start)
    span = max(end - start, 1e-9)
    out_tokens = sum(t.num_output for t in done)
    ttft = [t.first_token_s - t.arrival_s for t in done if t.first_token_s is not None]
    tpot = [(t.finish_s - t.first_token_s) / (t.num_output - 1) for t in done
            if t.num_output > 1 and t.finish_s is not None and t.first_token_s is not None]
    return RunMetrics(
        mode=run.mode, requests=len(ts), finished=len(done),
        rejected=sum(t.rejected for t in ts),
        truncated=sum(t.num_output < t.output_len for t in done),
        output_tokens=out_tokens, output_tokens_per_s=out_tokens / span,
        requests_per_s=len(done) / span,
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        tpot_p50_s=percentile(tpot, 50), tpot_p99_s=percentile(tpot, 99),
        wall_s=run.wall_s, span_s=span, num_steps=run.num_steps, step_tokens=run.step_tokens,
        output_tokens_per_step=out_tokens / max(1, run.num_steps), busy_s=run.busy_s,
        preemptions=run.preemptions, exchange_steps=run.exchange_steps,
        free_while_waiting=run.free_while_waiting / max(1, run.waiting_steps))
