"""The simulator run the way the engine runs: lockstep steps and the engine's scheduling rules.

`cluster.Simulator` lets each instance step at its own pace, plans on a timer, and admits a
request only when blocks for its whole prompt are free. The engine (ARCHITECTURE.md, "One engine
step") instead plans before every step, steps all instances together, and its scheduler
(`infinite_llm.worker.scheduler`) reserves blocks one chunk at a time: a request is admitted when
its whole remaining prompt fits beside the running requests' headroom, the cluster's oldest
request goes first, a running request that finds no block waits up to `MAX_STALLED_STEPS`
steps for a lease while some instance has free blocks, and otherwise the newest running request
is preempted (itself, if it is the newest and not the oldest in the cluster). Under memory
pressure these rules decide how much is recomputed and how many steps exchange queries, so a
simulator that predicts the engine follows them. This one keeps the simulator's gManager,
ledger, cost model and accounting unchanged and replaces only the clock and
`SimInstance.schedule`:

    plan (gManager) -> every instance schedules as the engine does -> step time =
    `CostModel.cluster_step_s`: the sync, the busy instances' a + b*tokens + c*kv_bytes as the
    hardware runs them at once, + e + d*bytes if anyone exchanges -> every instance finishes

A step in which nobody can run (requests wait for leases) costs the sync, like an engine step
that computes nothing; `SimConfig.max_stall_steps` is the engine's `MAX_STALLED_STEPS` here
(`engine_sim_config` sets it). Calibrations measured on the engine (`infinite_llm.sim.calibrate`)
describe such steps. The rules mirror the engine's scheduler: when it changes, this changes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from infinite_llm.cluster.gmanager import senior_first
from infinite_llm.sim.cluster import SimConfig, SimResult, Simulator
from infinite_llm.sim.cost import CostModel
from infinite_llm.sim.instance import SimInstance
from infinite_llm.sim.ledger import BlockLedger
from infinite_llm.sim.request import SimRequest, Status

if TYPE_CHECKING:
    from infinite_llm.config import EngineConfig
    from infinite_llm.sim.trace import TraceRequest


class EngineLikeInstance(SimInstance):
    """`SimInstance` with `infinite_llm.worker.scheduler.Scheduler.schedule`'s rules
    (`max_stall_steps` plays the engine's `MAX_STALLED_STEPS`): the senior request first and
    never self-preempted, admission only when the whole prompt and the running requests'
    headroom fit. As in the engine, preemption resets a request's count of stalled steps
    (`Request.reset_for_recompute`)."""

    def __init__(self, index: int, max_batched_tokens: int, max_num_seqs: int,
                 max_stall_steps: int) -> None:
        super().__init__(index, max_batched_tokens, max_num_seqs, max_stall_steps)
        self.stalled: dict[str, int] = {}  # request id -> steps it waited for a lease

    def _preempt(self, req: SimRequest, ledger: BlockLedger) -> None:
        self.stalled.pop(req.request_id, None)
        super()._preempt(req, ledger)

    def schedule(self, ledger: BlockLedger, can_borrow: bool = False,
                 senior: str | None = None) -> None:
        me, budget = self.index, self.max_batched_tokens
        batch: list[tuple[SimRequest, int]] = []
        preempted = False
        self.num_stalled = 0
        queue = deque(senior_first(self.running, senior))
        self.running = []
        while queue and budget > 0:
            req = queue.popleft()
            n = min(req.num_uncomputed, budget)
            while not ledger.grow(req, me, n):
                stalled = self.stalled.get(req.request_id, 0)
                waits = can_borrow and stalled < self.max_stall_steps
                if waits or (req.request_id == senior and not queue):
                    self.stalled[req.request_id] = stalled + 1
                    self.num_stalled += 1
                    self.running.append(req)
                    break
                if not queue:  # nobody left to preempt but itself
                    self._preempt(req, ledger)
                    preempted = True
                    break
                self._preempt(queue.pop(), ledger)
                preempted = True
            else:
                self.stalled.pop(req.request_id, None)
                self.running.append(req)
                batch.append((req, n))
                budget -= n
        self.running.extend(queue)  # not reached for budget: they keep their place
        self.waiting = deque(senior_first(self.waiting, senior))
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            req = self.waiting[0]
            n = min(req.num_uncomputed, budget)
            if req.request_id != senior and not self._fits(req, ledger):
                break
            if not ledger.grow(req, me, n):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            batch.append((req, n))
            budget -= n
        self.batch = batch
        self.batch_tokens = self.max_batched_tokens - budget

    def _fits(self, req: SimRequest, ledger: BlockLedger) -> bool:
        """The scheduler's admission rule (`Scheduler._fits`)."""
        committed = sum(ledger.blocks_for(r, r.num_uncomputed) + 1 for r in self.running)
        need = ledger.blocks_for(req, req.num_uncomputed)
        return need + committed <= ledger.available(self.index)


class LockstepSimulator(Simulator):
    def __init__(self, config: SimConfig, cost: CostModel,
                 trace: Sequence[TraceRequest]) -> None:
        super().__init__(config, cost, trace)
        self.engine_instances = [EngineLikeInstance(i, config.max_batched_tokens,
                                                    config.max_num_seqs, config.max_stall_steps)
                                 for i in range(config.num_instances)]
        self.instances = list(self.engine_instances)
        self._heartbeats = [inst.heartbeat(self.ledger) for inst in self.instances]

    def run(self) -> SimResult:
        start = time.perf_counter()
        reqs, res, ledger = self.requests, self.result, self.ledger
        pooled = self.config.mode == "pooled" and self.config.num_instances > 1
        waits = pooled and self.config.lend_to_running  # as the engine's `_has_spare`
        t = reqs[0].arrival_s if reqs else 0.0
        idle_steps = 0  # steps in a row in which nothing was sampled while requests ran
        while self._in_flight or self._next_arrival < len(reqs):
            if not self._in_flight and reqs[self._next_arrival].arrival_s > t:
                t = reqs[self._next_arrival].arrival_s
            self._tick(t)  # the plan; its wake-ups and timer are no-ops here (see below)
            can_borrow = waits and any(f > 0 for f in ledger.free)  # as the engine's plan says
            senior = self.senior_id()
            for i, inst in enumerate(self.engine_instances):
                if self._migrations[i]:
                    self._apply_migrations(i)
                inst.schedule(ledger, can_borrow, senior)
                self.dirty.add(i)
            t += self._lockstep_time()
            self._last_step_s = t
            res.num_steps += 1
            res.exchange_steps += any(len(req.blocks) > 1 for inst in self.instances
                                      for req, _ in inst.batch)
            sampled = sum(inst.num_sampled for inst in self.instances)
            for inst in self.instances:
                self._in_flight -= len(inst.finish_step(t, ledger))
            self._count_memory()
            progress = sum(inst.num_sampled for inst in self.instances) > sampled
            idle_steps = 0 if progress else idle_steps + 1
            if idle_steps > self.config.stuck_after_s / self.cost.cluster_step_s([]):
                raise RuntimeError(f"simulation stuck at t={t:.1f}s: {self._in_flight} requests "
                                   f"in flight and nothing sampled for "
                                   f"{self.config.stuck_after_s:.0f} s")
        ledger.expire_credit()  # the last plan's unused leases, as the engine's end_step
        ledger.check()
        res.num_preemptions = sum(i.num_preemptions for i in self.instances)
        res.wall_s = time.perf_counter() - start
        return res

    def _count_memory(self) -> None:
        """After a step: free memory while requests wait, in all and beside the queues, and
        the share of instances whose queue head needs more blocks than they can take now."""
        res, ledger = self.result, self.ledger
        queued = [inst for inst in self.instances if inst.waiting]
        if not queued:
            return
        total = ledger.total * len(self.instances)
        res.waiting_steps += 1
        res.free_while_waiting += sum(ledger.free) / total
        res.free_beside_queue += sum(ledger.free[inst.index] for inst in queued) / total
        res.blocked += sum(ledger.blocks_for(inst.waiting[0], inst.waiting[0].num_uncomputed)
                           > ledger.available(inst.index) for inst in queued) / len(self.instances)

    def _lockstep_time(self) -> float:
        """`CostModel.cluster_step_s` over the instances with a batch: their compute, plus the
        exchange of the slowest exchanging one."""
        compute, exchange = [], 0.0
        for inst in self.instances:
            if inst.batch:
                x = self._exchange_s(inst)
                compute.append(self._step_time(inst) - x)  # a + b*tokens + c*kv + extra
                exchange = max(exchange, x)
        return self.cost.cluster_step_s(compute, exchange)

    def _exchange_s(self, inst: SimInstance) -> float:
        """The exchange part of `_step_time` for this instance's batch (same counting)."""
        tokens = sum(n * (len(req.blocks) - (inst.index in req.blocks))
                     for req, n in inst.batch if len(req.blocks) > 1)
        return self.cost.exchange_s(tokens * self.cost.exchange_bytes_per_token)

    # The base class's event queue is not used: steps happen in `run`, in lockstep.
    def _push(self, t: float, kind: int) -> None:
        pass

    def _step(self, i: int, t: float) -> None:
        pass


def simulate_lockstep(config: SimConfig, cost: CostModel,
                      trace: Sequence[TraceRequest]) -> SimResult:
    return LockstepSimulator(config, cost, trace).run()


def engine_sim_config(config: EngineConfig, cost: CostModel) -> SimConfig:
    """The engine's configuration as the simulator spells it: the same instances, pools and
    budgets, the gManager as the engine builds it (an instance lends while its batch is below
    the token budget; no reserve; on CPU, leases only to instances with nothing running) and
    the scheduler's stall limit."""
    from infinite_llm.worker.scheduler import MAX_STALLED_STEPS

    if config.num_kv_blocks is None:
        raise ValueError("set num_kv_blocks: the simulator needs the pool size")
    return SimConfig(num_instances=config.num_instances, mode=config.kv_mode,
                     blocks_per_instance=config.num_kv_blocks, block_size=config.block_size,
                     max_batched_tokens=config.max_num_batched_tokens,
                     max_num_seqs=config.max_num_seqs,
                     plan_interval_s=cost.sync_step_s or cost.step_overhead_s,
                     efficient_batch_tokens=config.max_num_batched_tokens, reserve_blocks=0,
                     max_stall_steps=MAX_STALLED_STEPS,
                     lend_to_running=config.torch_device.type != "cpu")
