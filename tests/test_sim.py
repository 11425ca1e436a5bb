"""The cluster simulator: runs finish, every request is accounted once, and the modes differ
where they should (static rejects what one instance can't hold; pooled serves it). The lockstep
simulator schedules with the engine's scheduler over the ledger, which places blocks exactly as
the engine's rManager does."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from infinite_llm.cluster.gmanager import Lease
from infinite_llm.kvcache.pool import KVPool
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.request import Request, ScheduledBatch, Segment
from infinite_llm.sampling import SamplingParams
from infinite_llm.sim import trace as tr
from infinite_llm.sim.__main__ import main as sim_main
from infinite_llm.sim.cluster import PlannedCluster, SimConfig, Simulator, simulate
from infinite_llm.sim.cost import DEFAULT_CALIBRATION, CostModel
from infinite_llm.sim.ledger import BlockLedger, InstanceBlocks
from infinite_llm.sim.lockstep import LockstepSimulator
from infinite_llm.sim.report import memory_table, metrics
from infinite_llm.sim.request import Status
from infinite_llm.worker.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "benchmarks" / "traces" / "mixed_small.jsonl"
# A fixed cost model where exchange is cheap next to compute (as over a GPU interconnect), so the
# policy tests don't move when the measured CPU calibration is refreshed.
COST = CostModel(step_overhead_s=0.004, per_token_s=8e-5, per_kv_byte_s=1e-10,
                 per_exchange_byte_s=1e-9, exchange_step_s=0.0008, kv_bytes_per_token=8192,
                 exchange_bytes_per_token=8256)


def small_trace(num: int = 120, rate: float = 40.0, seed: int = 0) -> list[tr.TraceRequest]:
    return tr.generate(tr.TraceSpec(num=num, rate=rate, seed=seed, long_frac=0.15))


def assert_accounted(sim: PlannedCluster) -> None:
    """Every request finished or rejected exactly once, and every block is free again."""
    statuses = [r.status for r in sim.requests]
    assert all(s in (Status.FINISHED, Status.REJECTED) for s in statuses)
    assert len({r.request_id for r in sim.requests}) == len(sim.requests)
    for r in sim.requests:
        if r.status is Status.FINISHED:
            assert r.num_output == r.output_len and r.finish_s is not None
            assert r.first_token_s is not None and r.arrival_s <= r.first_token_s <= r.finish_s
        else:
            assert r.owner is None and r.first_token_s is None
        assert r.num_blocks == 0 and not r.blocks
    if isinstance(sim, LockstepSimulator):  # the engine requests are gone with their blocks
        assert all(isinstance(inst.scheduler, Scheduler) and not inst.requests
                   and not inst.scheduler.num_unfinished for inst in sim.instances)
    ledger = sim.ledger
    ledger.check()
    assert ledger.free == [ledger.total] * len(ledger.free)
    assert not any(ledger.borrowed) and not any(ledger.lent) and not any(ledger.own)


@pytest.mark.parametrize("mode", ["pooled", "static"])
@pytest.mark.parametrize("instances", [1, 3, 8])
def test_small_runs_finish_and_account_every_request(mode: str, instances: int) -> None:
    sim = Simulator(SimConfig(instances, mode), COST, small_trace())
    result = sim.run()
    assert_accounted(sim)
    m = metrics(result)
    assert m.finished + m.rejected == m.requests == 120
    assert m.output_tokens_per_s > 0 and m.ttft_p50_s > 0 and m.tpot_p50_s > 0
    if mode == "static":
        assert result.num_leases == 0 and result.num_migrations == 0


def test_pooled_run_lends_and_stays_balanced_under_pressure() -> None:
    """A heavy load on small instances: leases, migrations and preemptions all happen, and the
    ledger's invariants hold at the end."""
    trace = tr.generate(tr.TraceSpec(num=300, rate=200.0, seed=3, long_frac=0.3))
    sim = Simulator(SimConfig(4, "pooled", blocks_per_instance=32), COST, trace)
    result = sim.run()
    assert_accounted(sim)
    assert result.num_leases > 0 and result.num_migrations > 0 and result.num_preemptions > 0
    assert metrics(result).rejected == 0


def test_static_rejects_what_one_instance_cannot_hold_and_pooled_serves_it() -> None:
    cfg = dict(num_instances=4, blocks_per_instance=48, block_size=16)  # 768 tokens each
    trace = [tr.TraceRequest("chat", 0.0, 20, 10), tr.TraceRequest("doc", 0.01, 2000, 20),
             tr.TraceRequest("chat2", 0.02, 30, 10)]
    static = Simulator(SimConfig(mode="static", **cfg), COST, trace)
    static.run()
    assert_accounted(static)
    assert {r.request_id: r.status for r in static.requests}["doc"] is Status.REJECTED
    pooled = Simulator(SimConfig(mode="pooled", **cfg), COST, trace)
    result = pooled.run()
    assert_accounted(pooled)
    doc = next(r for r in pooled.requests if r.request_id == "doc")
    assert doc.status is Status.FINISHED and result.num_leases > 0
    # and a request larger than the whole cluster is rejected in pooled mode too
    huge = [tr.TraceRequest("huge", 0.0, 4 * 768 + 1, 4)]
    assert simulate(SimConfig(mode="pooled", **cfg), COST, huge).requests[0].status \
        is Status.REJECTED


def test_pooled_beats_static_where_long_requests_strand_memory() -> None:
    """The checked-in trace: long documents straddle one instance's 768 tokens of KV."""
    trace = tr.load(CHECKED_IN)
    pooled, static = (metrics(simulate(SimConfig(8, mode), COST, trace))
                      for mode in ("pooled", "static"))
    assert static.rejected > 0 and pooled.rejected == 0
    assert pooled.output_tokens_per_s >= static.output_tokens_per_s
    assert pooled.window_tokens_per_s >= static.window_tokens_per_s
    assert pooled.requests_per_s >= static.requests_per_s


def test_stranded_cluster_does_not_deadlock() -> None:
    """Every instance's queue is headed by a request a little larger than one instance."""
    trace = [tr.TraceRequest(f"doc{i}", 0.0, 800 + 37 * i, 8) for i in range(12)]
    sim = Simulator(SimConfig(4, "pooled", stuck_after_s=30.0), COST, trace)
    sim.run()
    assert_accounted(sim)
    assert all(r.status is Status.FINISHED for r in sim.requests)


@pytest.mark.parametrize("lend_to_running", [True, False])
def test_lockstep_pair_too_large_to_run_together_finishes(lend_to_running: bool) -> None:
    """The engine's rules (lockstep.py): two requests that each outgrow one instance and
    together the cluster, prefilled 8 tokens a step, both finish (the older one keeps its
    blocks and is lent to first), with one preemption at most."""
    trace = [tr.TraceRequest(f"doc{i}", 0.0, 48, 8) for i in range(2)]
    cfg = SimConfig(2, "pooled", blocks_per_instance=10, block_size=4, max_batched_tokens=8,
                    reserve_blocks=0, stuck_after_s=30.0,
                    lend_to_running=lend_to_running)
    sim = LockstepSimulator(cfg, COST, trace)
    result = sim.run()
    assert_accounted(sim)
    assert all(r.status is Status.FINISHED for r in sim.requests)
    assert result.num_preemptions <= 1


def test_lockstep_counts_memory_stranded_beside_a_blocked_head() -> None:
    """One instance of 4 blocks x 16 tokens. `a` (33 + 3 tokens) takes 3 blocks; `b` (33) needs
    3 and the admission headroom a block for `a`, so it waits two steps beside 1 free block
    (blocked: 25% free), then once with all 4 free after `a` finishes (not blocked), and runs
    in the fourth step: 3 waiting steps, free (0.25 + 0.25 + 1) / 3 = 50%, head blocked in 2 of
    4 instance-steps, 4 output tokens in 4 steps."""
    trace = [tr.TraceRequest("a", 0.0, 33, 3), tr.TraceRequest("b", 0.0, 33, 1)]
    cfg = SimConfig(1, "static", blocks_per_instance=4, block_size=16, reserve_blocks=0)
    sim = LockstepSimulator(cfg, COST, trace)
    m = metrics(sim.run())
    assert_accounted(sim)
    assert (m.steps, m.output_tokens_per_step, m.exchange_steps) == (4, 1.0, 0)
    assert (m.free_while_waiting, m.free_beside_queue, m.blocked_share) == (0.5, 0.5, 0.5)


def test_lockstep_memory_table_where_long_requests_strand_static_memory() -> None:
    """`halfplus_4x1k`: every request needs more than half of one instance, so a static
    instance holds one and the rest of its memory waits beside its queue; pooling without
    lending to running instances (the CPU policy) runs the same schedule, and lending to
    them (exchange as cheap as a GPU's) uses some of that memory, exchanging to do it.
    Arrivals 10x denser: this cost model's instances are faster than the CPU the trace is
    sized for, and the trace is meant to keep them saturated."""
    trace = [replace(r, arrival_s=r.arrival_s / 10)
             for r in tr.load(ROOT / "benchmarks" / "traces" / "halfplus_4x1k.jsonl")]
    cfg = SimConfig(4, "static", blocks_per_instance=64, reserve_blocks=0,
                    efficient_batch_tokens=256, lend_to_running=False)
    static, cpu, lending = (
        metrics(LockstepSimulator(c, COST, trace).run())
        for c in (cfg, replace(cfg, mode="pooled"), replace(cfg, mode="pooled",
                                                            lend_to_running=True)))
    assert static.exchange_steps == cpu.exchange_steps == 0
    assert static.free_beside_queue > 0.35 and static.blocked_share > 0.5
    assert (cpu.steps, cpu.output_tokens_per_step, cpu.free_while_waiting) == \
        (static.steps, static.output_tokens_per_step, static.free_while_waiting)
    assert lending.exchange_steps > 0
    assert lending.free_while_waiting < static.free_while_waiting
    assert lending.output_tokens_per_step > static.output_tokens_per_step
    assert lending.preemptions >= static.preemptions == 0
    assert "beside queue" in memory_table([static, cpu, lending])


def engine_request(request_id: str, num_tokens: int) -> Request:
    return Request(request_id, [0] * num_tokens, SamplingParams(), 8, frozenset())


def placement(request: Request) -> list[tuple[int, int, int]]:
    return [(s.instance, s.start, s.num_blocks) for s in request.segments]


def test_ledger_places_blocks_where_the_rmanager_does() -> None:
    """Instance 0 of 8 blocks x 4 tokens, with leases of 4 blocks from instance 1 and 2 from
    instance 2. `b` spills onto instance 1; once `a` frees 4 local blocks, `b` still grows on
    instance 1 (its tail, as `RManager.reserve` places), and `c` takes the local blocks, then
    the creditors by most room (instance 2's two before instance 1's last); `d` finds no block
    where it needs 2 and changes nothing."""
    rmanager = RManager(KVPool(1, 8, 4, 1, 1, torch.float32, torch.device("cpu")), 0)
    ledger = BlockLedger(3, 8, 4, set())
    blocks = InstanceBlocks(ledger, 0)
    for creditor, n in ((1, 4), (2, 2)):
        rmanager.receive_lease(creditor, n)
        ledger.lend(Lease(0, creditor, n))
    pairs = {rid: (engine_request(rid, 64), engine_request(rid, 64)) for rid in "abcd"}

    def both(op: str, rid: str, *args: int) -> list[tuple[int, int, int]]:
        engine, sim = pairs[rid]
        results = [getattr(owner, op)(r, *args) for owner, r in ((rmanager, engine), (blocks, sim))]
        assert results[0] == results[1]
        assert placement(engine) == placement(sim)
        assert rmanager.available_blocks() == blocks.available_blocks()
        return placement(sim)

    assert both("reserve", "a", 16) == [(0, 0, 4)]
    assert both("reserve", "b", 24) == [(0, 0, 4), (1, 16, 2)]
    both("free", "a")
    for r in pairs["b"]:
        r.num_computed_tokens = 24
    assert both("reserve", "b", 4) == [(0, 0, 4), (1, 16, 3)]
    assert both("reserve", "c", 28) == [(0, 0, 4), (2, 16, 2), (1, 24, 1)]
    assert both("reserve", "d", 8) == []
    assert blocks.available_blocks() == 0 and (ledger.free, ledger.own, ledger.borrowed) == \
        ([0, 4, 6], [8, 0, 0], [6, 0, 0])
    ledger.check()


@pytest.mark.parametrize("seed", range(4))
def test_ledger_allocator_matches_the_rmanager_through_random_steps(seed: int) -> None:
    """Random reserves, frees, migrations out, leases and their expiry on one owner: the
    ledger's allocator and a real `RManager` answer alike and place every block alike."""
    rng = random.Random(seed)
    rmanager = RManager(KVPool(1, 12, 4, 1, 1, torch.float32, torch.device("cpu")), 0)
    ledger = BlockLedger(4, 12, 4, set())
    blocks = InstanceBlocks(ledger, 0)
    pairs = [(engine_request(f"r{i}", 200), engine_request(f"r{i}", 200)) for i in range(5)]
    for _ in range(400):
        engine, sim = rng.choice(pairs)
        op = rng.random()
        if op < 0.5:
            n = rng.randint(1, 24)
            assert rmanager.reserve(engine, n) == blocks.reserve(sim, n)
            if rng.random() < 0.5 and blocks.blocks_needed(sim, n) == 0:
                engine.num_computed_tokens = sim.num_computed_tokens = \
                    min(200, sim.num_computed_tokens + n)
        elif op < 0.65:
            rmanager.free(engine)
            blocks.free(sim)
            engine.num_computed_tokens = sim.num_computed_tokens = 0
        elif op < 0.75:
            target = rng.randint(1, 3)
            if any(s.instance == 0 for s in sim.segments) \
                    and blocks.migrate_out(sim, target):
                rmanager.migrate_out(engine, target)
        elif op < 0.9:
            creditor = rng.randint(1, 3)
            n = rng.randint(1, max(1, ledger.free[creditor]))
            if ledger.free[creditor]:
                ledger.lend(Lease(0, creditor, n))
                rmanager.receive_lease(creditor, n)
        else:
            ledger.expire_credit()
            rmanager.end_step()
        assert placement(engine) == placement(sim)
        assert rmanager.available_blocks() == blocks.available_blocks()
        assert rmanager.stats().own == ledger.own[0]
        assert rmanager.stats().borrowed == ledger.borrowed[0]
        ledger.check()


def test_lockstep_step_exchanges_for_a_request_whose_kv_is_all_elsewhere() -> None:
    """A request whose blocks all lie on a creditor (admitted on a lease, or migrated whole)
    sends its queries there every step, as in the engine: the step pays the exchange, and the
    creditor the attention over its 21 tokens of context in its next step."""
    sim = LockstepSimulator(SimConfig(2, "pooled", block_size=16), COST, [])
    request = engine_request("remote", 20)
    request.segments.append(Segment(1, 0, 2))
    request.num_computed_tokens = 20
    sim.instances[0].batch = ScheduledBatch.of([request], [1])
    kv = COST.per_kv_byte_s * 21 * COST.kv_bytes_per_token
    assert sim._step_s() == COST.cluster_step_s(
        [COST.compute_s(1, 21 * COST.kv_bytes_per_token)],
        COST.exchange_s(COST.exchange_bytes_per_token))
    assert sim.instances[1].extra_s == kv


def test_runs_are_deterministic() -> None:
    a, b = (metrics(simulate(SimConfig(6, "pooled"), COST, small_trace(seed=5)))
            for _ in range(2))
    assert (a.output_tokens_per_s, a.ttft_p99_s, a.preemptions, a.leased_blocks) == \
        (b.output_tokens_per_s, b.ttft_p99_s, b.preemptions, b.leased_blocks)


def test_1024_instances_finish_quickly() -> None:
    """Idle instances cost nothing and busy ones cost O(batch) per step."""
    trace = tr.tile(small_trace(num=16, rate=32.0), 128)  # 2048 requests over 1024 instances
    start = time.perf_counter()
    result = simulate(SimConfig(1024, "pooled"), COST, trace)
    elapsed = time.perf_counter() - start
    m = metrics(result)
    assert m.finished + m.rejected == len(trace)
    assert elapsed < 15.0, f"1024 instances took {elapsed:.1f} s"  # ~3 s on 2 cores


def test_trace_generation_is_seeded_and_round_trips(tmp_path: Path) -> None:
    spec = tr.TraceSpec(num=50, rate=10.0, seed=7, long_frac=0.5)
    a = tr.generate(spec)
    assert a == tr.generate(spec) and a != tr.generate(tr.TraceSpec(num=50, seed=8))
    assert all(8 <= r.prompt_len <= 64 or 256 <= r.prompt_len <= 1024 for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    path = tmp_path / "t.jsonl"
    tr.save(a, path)
    assert tr.load(path) == a
    assert set(json.loads(path.read_text().splitlines()[0])) == {
        "request_id", "arrival_s", "prompt_len", "output_len"}
    tiled = tr.tile(a, 3)
    assert len(tiled) == 150 and len({r.request_id for r in tiled}) == 150
    path.write_text('{"request_id": "x", "arrival_s": 0}\n')
    with pytest.raises(ValueError, match="not a trace line"):
        tr.load(path)


def test_trace_cli_and_checked_in_trace(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    tr.main(["--num", "20", "--rate", "5", "--seed", "1", "--out", str(out)])
    assert len(tr.load(out)) == 20
    checked_in = tr.load(CHECKED_IN)
    assert len(checked_in) == 200 and CHECKED_IN.stat().st_size < 20_000


def test_calibration_file_is_complete_and_strict(tmp_path: Path) -> None:
    cost = CostModel.from_json(DEFAULT_CALIBRATION)
    assert cost.efficient_batch_tokens() >= 1
    assert cost.step_s(10, 0, 0) < cost.step_s(10, 10**6, 0) < cost.step_s(10, 10**6, 10**4)
    data = json.loads(DEFAULT_CALIBRATION.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "per_tokn_s": 1.0}))
    with pytest.raises(ValueError, match="unknown"):
        CostModel.from_json(bad)
    del data["per_token_s"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing"):
        CostModel.from_json(bad)


def test_cli_prints_a_table_and_writes_a_plot(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    sim_main(["--instances", "2", "4", "--trace", str(CHECKED_IN), "--trace-instances", "2",
              "--plots", str(tmp_path)])
    out = capsys.readouterr().out
    assert "pooled" in out and "static" in out and "ratio" in out
    assert (tmp_path / "sim_pooled_vs_static.png").stat().st_size > 10_000
