"""The simulator run the way the engine runs: lockstep steps, each instance on the engine's own
scheduler.

`cluster.Simulator` lets each instance step at its own pace, plans on a timer, and schedules with
a policy of its own (`instance.SimInstance`). The engine (ARCHITECTURE.md, "One engine step")
plans before every step, steps all instances together, and schedules each with
`infinite_llm.worker.scheduler.Scheduler`, whose rules (the senior request first and never
preempted, a running request waiting for a lease rather than preempting, admission only when the
whole prompt and the running requests' headroom fit) decide, under memory pressure, how much is
recomputed and how many steps exchange queries. So each instance here runs that scheduler itself,
over engine `Request`s (made when the gManager places a trace request, dropped when it finishes)
and over the ledger as its block allocator (`ledger.InstanceBlocks`, which places blocks as
`RManager` does). The gManager, ledger, cost model and accounting are those of
`cluster.PlannedCluster`; a step is

    plan (gManager) -> every instance's scheduler picks its batch -> step time =
    `CostModel.cluster_step_s`: the sync, the busy instances' a + b*tokens + c*kv_bytes as the
    hardware runs them at once, + e + d*bytes if anyone exchanges -> every instance advances its
    batch as the engine's forward and sampler do (the sampled token is 0; a request finishes at
    its output length)

A step in which nobody can run (requests wait for leases) costs the sync, like an engine step
that computes nothing; calibrations measured on the engine (`infinite_llm.sim.calibrate`)
describe such steps. What stays a model: blocks a request frees on a creditor are free there at
once (the engine tells the creditor at the next plan), and the attention a creditor computes for
others is charged to its next step with a batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from infinite_llm.cluster.gmanager import Heartbeat
from infinite_llm.request import Request, ScheduledBatch
from infinite_llm.sampling import SamplingParams
from infinite_llm.sim.cluster import PlannedCluster, SimConfig, SimResult
from infinite_llm.sim.cost import CostModel
from infinite_llm.sim.ledger import BlockLedger, InstanceBlocks
from infinite_llm.sim.request import SimRequest, Status
from infinite_llm.worker.scheduler import Scheduler

if TYPE_CHECKING:
    from infinite_llm.config import EngineConfig
    from infinite_llm.sim.trace import TraceRequest


class LockstepInstance:
    """One simulated instance as the engine steps it (`infinite_llm.worker.instance`): the
    engine's scheduler over this instance's blocks in the ledger, the requests it owns, and the
    batch of its latest step."""

    def __init__(self, index: int, ledger: BlockLedger, max_num_batched_tokens: int,
                 max_num_seqs: int) -> None:
        self.index = index
        self.ledger = ledger
        self.blocks = InstanceBlocks(ledger, index)
        self.scheduler = Scheduler(self.blocks, max_num_batched_tokens, max_num_seqs)
        self.requests: dict[str, Request] = {}
        self.batch = ScheduledBatch()
        self.extra_s = 0.0  # work for others (remote attention, migrations) paid in our next step
        self.num_sampled = 0  # output tokens sampled so far

    def add(self, req: SimRequest) -> None:
        """Own a placed request, as the engine's instance adds one: greedy, no EOS, `max_tokens`
        its output length. The prompt's token ids are never read: zeros."""
        request = Request(req.request_id, [0] * req.prompt_len,
                          SamplingParams(temperature=0.0, max_tokens=req.output_len,
                                         ignore_eos=True),
                          req.output_len, frozenset(), arrival_time=req.arrival_s)
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def finish_step(self) -> tuple[Request, ...]:
        """Advance the batch's requests past this step's tokens, append token 0 where they
        sample, and free the finished ones, as the engine's instance does after its forward.
        Returns the requests that sampled."""
        batch = self.batch
        for request, n in zip(batch.requests, batch.num_tokens):
            request.num_computed_tokens += n
        sampled = batch.sampling
        for request in sampled:
            request.append_token(0)
            if request.is_finished:
                self.scheduler.finish(request)
                del self.requests[request.request_id]
        self.num_sampled += len(sampled)
        return sampled

    def heartbeat(self) -> Heartbeat:
        """What the engine reports of an instance after its step (`cluster.driver.heartbeat`),
        from the same counts: `RManager`'s stats, own blocks by request (largest first, then by
        id), lenders (most blocks first), and the scheduler's `load`."""
        ledger, me = self.ledger, self.index
        own: list[tuple[str, int]] = []
        lenders: dict[int, int] = {}
        for r in self.scheduler.running:
            here = 0
            for s in r.segments:
                if s.instance == me:
                    here += s.num_blocks
                else:
                    lenders[s.instance] = lenders.get(s.instance, 0) + s.num_blocks
            if here:
                own.append((r.request_id, here))
        load = self.scheduler.load(ledger.block_size)
        return Heartbeat(
            instance=me, total_blocks=ledger.total, free_blocks=ledger.free[me],
            own_blocks=ledger.own[me], lent_blocks=ledger.lent[me],
            borrowed_blocks=ledger.borrowed[me], num_running=load.num_running,
            num_waiting=load.num_waiting, batch_tokens=self.batch.total_tokens,
            request_blocks=tuple(sorted(own, key=lambda rb: (-rb[1], rb[0]))),
            prefill_tokens=load.prefill_tokens, waiting_tokens=load.waiting_tokens,
            head_tokens=load.head_tokens,
            lenders=tuple(sorted(lenders, key=lambda c: (-lenders[c], c))),
            num_stalled=load.num_stalled)


def _blocks_by_instance(request: Request) -> dict[int, int]:
    held: dict[int, int] = {}
    for s in request.segments:
        held[s.instance] = held.get(s.instance, 0) + s.num_blocks
    return held


class LockstepSimulator(PlannedCluster):
    """The cluster stepping as the engine does (the module's docstring). Steps go on, as the
    engine's do, while requests are in flight or creditors are still to be told of frees and
    unused leases."""

    def __init__(self, config: SimConfig, cost: CostModel,
                 trace: Sequence[TraceRequest]) -> None:
        super().__init__(config, cost, trace)
        self.instances = [LockstepInstance(i, self.ledger, config.max_batched_tokens,
                                           config.max_num_seqs)
                          for i in range(config.num_instances)]
        self._heartbeats = [inst.heartbeat() for inst in self.instances]

    def run(self) -> SimResult:
        start = time.perf_counter()
        reqs, res, ledger = self.requests, self.result, self.ledger
        pooled = self.config.mode == "pooled" and self.config.num_instances > 1
        waits = pooled and self.config.lend_to_running  # as the engine's `_has_spare`
        t = reqs[0].arrival_s if reqs else 0.0
        idle_steps = 0  # steps in a row in which nothing was sampled while requests ran
        while self._in_flight or self._next_arrival < len(reqs) or ledger.creditors_to_tell():
            if not self._in_flight and not ledger.creditors_to_tell():  # idle until an arrival
                t = max(t, reqs[self._next_arrival].arrival_s)
            self._plan(t)
            can_borrow = waits and any(f > 0 for f in ledger.free)  # as the engine's plan says
            senior = self.senior_id()
            for i, inst in enumerate(self.instances):
                if self._migrations[i]:
                    self._apply_migrations(i)
                inst.batch = inst.scheduler.schedule(can_borrow, senior)
                self.dirty.add(i)
            t += self._step_s()
            res.num_steps += 1
            sampled = 0
            for inst in self.instances:
                for request in inst.finish_step():
                    sampled += 1
                    self._record(request, t)
            self._count_memory()
            idle_steps = 0 if sampled else idle_steps + 1
            if idle_steps > self.config.stuck_after_s / self.cost.cluster_step_s([]):
                raise RuntimeError(f"simulation stuck at t={t:.1f}s: {self._in_flight} requests "
                                   f"in flight and nothing sampled for "
                                   f"{self.config.stuck_after_s:.0f} s")
        ledger.check()
        res.num_preemptions = sum(inst.scheduler.num_preemptions for inst in self.instances)
        res.wall_s = time.perf_counter() - start
        return res

    def _place(self, req: SimRequest, i: int) -> None:
        self.instances[i].add(req)

    def _heartbeat(self, i: int) -> Heartbeat:
        return self.instances[i].heartbeat()

    def _num_sampled(self) -> int:
        return sum(inst.num_sampled for inst in self.instances)

    def _record(self, request: Request, t: float) -> None:
        """Note on the trace request what its engine request did at this step's end `t`."""
        req = self._by_id[request.request_id]
        if req.first_token_s is None:
            req.first_token_s = t
        if request.is_finished:
            req.finish_s, req.status = t, Status.FINISHED
            req.num_output, req.num_preemptions = request.num_output_tokens, request.num_preemptions
            self._in_flight -= 1

    def _apply_migrations(self, i: int) -> None:
        """The plan's migrations from instance i, before it schedules: as the engine's
        instance moves a running request's KV on it to the target."""
        inst = self.instances[i]
        for m in self._migrations[i]:
            request = inst.requests.get(m.request_id)
            if request is None:
                continue  # finished since the plan
            moved = inst.blocks.migrate_out(request, m.target)
            if moved:
                s = self.cost.per_exchange_byte_s * moved * self._kv_block_bytes
                inst.extra_s += s
                self.instances[m.target].extra_s += s
                self.result.num_migrations += 1
                self.result.migrated_blocks += moved
        self._migrations[i].clear()

    def _count_memory(self) -> None:
        """After a step, as the engine's replay counts from the heartbeats: whether an instance
        with KV elsewhere computed; free memory while requests wait, in all and beside the
        queues; and the share of instances whose queue head needs more blocks than they can
        take now."""
        res, ledger = self.result, self.ledger
        res.exchange_steps += any(ledger.borrowed[inst.index] and inst.batch.requests
                                  for inst in self.instances)
        queued = [inst for inst in self.instances if inst.scheduler.waiting]
        if not queued:
            return
        total = ledger.total * len(self.instances)
        res.waiting_steps += 1
        res.free_while_waiting += sum(ledger.free) / total
        res.free_beside_queue += sum(ledger.free[inst.index] for inst in queued) / total
        res.blocked += sum(_head_blocked(inst) for inst in queued) / len(self.instances)

    def _step_s(self) -> float:
        """`CostModel.cluster_step_s` over the instances with a batch: their compute, plus the
        exchange of the slowest exchanging one."""
        compute, exchange = [], 0.0
        for inst in self.instances:
            if inst.batch.requests:
                own_s, exchange_s = self._instance_step_s(inst)
                compute.append(own_s)
                exchange = max(exchange, exchange_s)
        return self.cost.cluster_step_s(compute, exchange)

    def _instance_step_s(self, inst: LockstepInstance) -> tuple[float, float]:
        """(compute, exchange) of the instance's batch. A request's context (its computed
        tokens and this step's) is split over the instances holding its blocks in proportion
        to their blocks; a request with blocks elsewhere exchanges its tokens with each of
        those instances, and they are charged for its attention in their next step. The
        owner computes `a + b*tokens + c*max(local KV, the largest remote share)`, since
        creditors compute their partials while it computes its own, plus the work for others
        it was charged."""
        me, cost = inst.index, self.cost
        local = 0.0
        remote: dict[int, float] = {}
        exchange_tokens = 0
        batch = inst.batch
        for request, start, n in zip(batch.requests, batch.starts, batch.num_tokens):
            context = start + n
            held = _blocks_by_instance(request)
            if held.keys() == {me}:
                local += context
                continue
            per_block = context / sum(held.values())
            for j, b in held.items():
                if j == me:
                    local += b * per_block
                else:
                    remote[j] = remote.get(j, 0.0) + b * per_block
                    exchange_tokens += n
        attention_tokens = local
        if remote:
            attention_tokens = max(local, max(remote.values()))
            for j, tokens in remote.items():
                self.instances[j].extra_s += cost.per_kv_byte_s * tokens * cost.kv_bytes_per_token
        own_s = cost.compute_s(batch.total_tokens,
                               round(attention_tokens * cost.kv_bytes_per_token)) + inst.extra_s
        inst.extra_s = 0.0
        return own_s, cost.exchange_s(exchange_tokens * cost.exchange_bytes_per_token)


def _head_blocked(inst: LockstepInstance) -> bool:
    """Whether the instance's first waiting request needs more blocks than it can take now."""
    head = inst.scheduler.waiting[0]
    return inst.blocks.blocks_needed(head, head.num_uncomputed_tokens) \
        > inst.blocks.available_blocks()


def simulate_lockstep(config: SimConfig, cost: CostModel,
                      trace: Sequence[TraceRequest]) -> SimResult:
    return LockstepSimulator(config, cost, trace).run()


def engine_sim_config(config: EngineConfig, cost: CostModel) -> SimConfig:
    """The engine's configuration as the simulator spells it: the same instances, pools and
    budgets, and the gManager as the engine builds it (an instance lends while its batch is
    below the token budget; no reserve; on CPU, leases only to instances with nothing
    running)."""
    cache, scheduler = config.cache, config.scheduler
    if cache.num_kv_blocks is None:
        raise ValueError("set num_kv_blocks: the simulator needs the pool size")
    return SimConfig(num_instances=config.cluster.num_instances, mode=config.cluster.kv_mode,
                     blocks_per_instance=cache.num_kv_blocks, block_size=cache.block_size,
                     max_batched_tokens=scheduler.max_num_batched_tokens,
                     max_num_seqs=scheduler.max_num_seqs,
                     plan_interval_s=cost.sync_step_s or cost.step_overhead_s,
                     efficient_batch_tokens=scheduler.max_num_batched_tokens, reserve_blocks=0,
                     lend_to_running=config.load.torch_device.type != "cpu")
