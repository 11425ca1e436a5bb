"""A discrete-event simulator of a cluster driven by the real gManager policy, unchanged.

Events are instance step ends and gManager plan ticks, in one heap ordered by (time, sequence).
Instances step asynchronously, each at its own pace (step time from the cost model), and an
instance with nothing it can run leaves the heap until a plan gives it work: idle instances cost
nothing. Every `plan_interval_s` while requests are in flight (or at the first tick after the next
arrival when none are), a tick expires last period's unused leases, rebuilds the heartbeats of the
instances that changed, calls `GManager.plan` with the arrivals since the last tick, and applies
the plan: placements join waiting queues, leases set blocks aside at once, migrations run at the
source's next step end.

Modes: `pooled` (leases and migrations; a request is rejected only if it exceeds the whole cluster)
and `static` (the gManager places only; a request larger than one instance is rejected).

Step time of an instance, with `c` the cost per KV byte: `a + b*tokens + c*max(local KV bytes,
the largest remote segment set) + exchange`, since creditors compute their partials while the
owner computes its own; each creditor also pays `c * (bytes it hosts)` in its next step (a
creditor that is idle absorbs it). A migration costs `d * bytes moved` to source and target.
"""

from __future__ import annotations

import heapq
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infinite_llm.cluster.gmanager import GManager, GManagerConfig, Heartbeat, Migration, NewRequest
from infinite_llm.sim.cost import CostModel
from infinite_llm.sim.instance import SimInstance
from infinite_llm.sim.ledger import BlockLedger
from infinite_llm.sim.request import SimRequest, Status

if TYPE_CHECKING:
    from infinite_llm.sim.trace import TraceRequest

MODES = ("pooled", "static")
_PLAN = -1  # heap entry kind: a gManager tick rather than an instance's step end
_DONE = (Status.FINISHED, Status.REJECTED)


@dataclass(frozen=True, slots=True)
class SimConfig:
    num_instances: int
    mode: str = "pooled"
    blocks_per_instance: int = 48
    block_size: int = 16
    max_batched_tokens: int = 256
    max_num_seqs: int = 32
    plan_interval_s: float = 0.02
    reserve_blocks: int = 2
    lookahead_tokens: int = 16
    max_migrations: int = 2
    max_stall_steps: int = 8  # SimInstance only: lockstep has the scheduler's MAX_STALLED_STEPS
    efficient_batch_tokens: int | None = None  # None: from the cost model
    lend_to_running: bool = True  # GManagerConfig.lend_to_running
    stuck_after_s: float = 600.0  # raise if nothing ran for this long with requests in flight

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if min(self.num_instances, self.blocks_per_instance, self.block_size,
               self.max_batched_tokens, self.max_num_seqs) < 1 or self.plan_interval_s <= 0:
            raise ValueError(f"SimConfig sizes and plan_interval_s must be positive: {self}")

    @property
    def instance_tokens(self) -> int:
        return self.blocks_per_instance * self.block_size


@dataclass(slots=True)
class SimResult:
    config: SimConfig
    requests: list[SimRequest]
    num_plans: int = 0
    num_steps: int = 0
    num_leases: int = 0
    leased_blocks: int = 0
    num_migrations: int = 0
    migrated_blocks: int = 0
    num_preemptions: int = 0
    window_s: float = 0.0  # from the first arrival to the first plan after the last one
    window_tokens: int = 0  # output tokens sampled in that window
    wall_s: float = 0.0
    # Lockstep only, counted after every step as the engine's replay counts them
    # (`infinite_llm.sim.replay`): where memory sits while requests wait.
    exchange_steps: int = 0  # steps in which an instance with KV elsewhere computed
    waiting_steps: int = 0  # steps after which some request waited for admission
    free_while_waiting: float = 0.0  # sum over those steps: free fraction of all blocks
    free_beside_queue: float = 0.0  # the same, counting only instances with a queue
    blocked: float = 0.0  # sum over steps: share of instances whose queue head doesn't fit


class PlannedCluster(ABC):
    """What both simulators share: the trace's requests, the gManager and how its plans are
    applied, the ledger and the result. A subclass owns the instances and says how a placed
    request joins one (`_place`), what one reports (`_heartbeat`) and how many output tokens
    all have sampled (`_num_sampled`); it calls `_plan` when the engine would plan."""

    def __init__(self, config: SimConfig, cost: CostModel, trace: Sequence[TraceRequest]) -> None:
        self.config = config
        self.cost = cost
        self.requests = [SimRequest(r.request_id, r.arrival_s, r.prompt_len, r.output_len)
                         for r in sorted(trace, key=lambda r: r.arrival_s)]
        self._by_id = {r.request_id: r for r in self.requests}
        if len(self._by_id) != len(self.requests):
            raise ValueError("duplicate request ids in trace")
        n = config.num_instances
        self.gmanager = GManager(GManagerConfig(
            block_size=config.block_size,
            efficient_batch_tokens=config.efficient_batch_tokens or cost.efficient_batch_tokens(),
            reserve_blocks=config.reserve_blocks, lookahead_tokens=config.lookahead_tokens,
            max_migrations=config.max_migrations, pooling=config.mode == "pooled",
            lend_to_running=config.lend_to_running))
        self.dirty: set[int] = set()
        self.ledger = BlockLedger(n, config.blocks_per_instance, config.block_size, self.dirty)
        self._heartbeats: list[Heartbeat] = []  # the subclass's, once it has its instances
        self._migrations: list[list[Migration]] = [[] for _ in range(n)]
        self._next_arrival = 0
        self._oldest = 0  # no request before this index is in flight
        self._in_flight = 0
        self._kv_block_bytes = cost.kv_bytes_per_token * config.block_size
        self._max_kv_tokens = config.instance_tokens * (n if config.mode == "pooled" else 1)
        self.result = SimResult(config, self.requests)

    def _plan(self, t: float) -> set[int]:
        """The gManager's plan at t over the arrivals since the last one, applied: placements
        join their owner's queue, leases set blocks aside, migrations wait for their source's
        next step. Returns the instances the plan gave something to do."""
        ledger, res = self.ledger, self.result
        ledger.expire_credit()
        new = []
        while (self._next_arrival < len(self.requests)
               and self.requests[self._next_arrival].arrival_s <= t):
            req = self.requests[self._next_arrival]
            self._next_arrival += 1
            if req.max_kv_tokens > self._max_kv_tokens:
                req.status = Status.REJECTED
            else:
                new.append(NewRequest(req.request_id, req.prompt_len, req.output_len))
        for i in self.dirty:
            self._heartbeats[i] = self._heartbeat(i)
        self.dirty.clear()
        plan = self.gmanager.plan(self._heartbeats, new, self._senior())
        res.num_plans += 1
        wake = set()
        for p in plan.placements:
            req = self._by_id[p.request_id]
            req.owner, req.status = p.instance, Status.WAITING
            self._place(req, p.instance)
            self.dirty.add(p.instance)
            wake.add(p.instance)
            self._in_flight += 1
        for lease in plan.leases:
            ledger.lend(lease)
            wake.add(lease.debtor)
            res.num_leases += 1
            res.leased_blocks += lease.num_blocks
        for m in plan.migrations:
            self._migrations[m.source].append(m)
            wake.add(m.source)
        if self._next_arrival == len(self.requests) and not res.window_s:
            res.window_s = t - self.requests[0].arrival_s
            res.window_tokens = self._num_sampled()
        return wake

    @abstractmethod
    def _place(self, req: SimRequest, i: int) -> None: ...

    @abstractmethod
    def _heartbeat(self, i: int) -> Heartbeat: ...

    @abstractmethod
    def _num_sampled(self) -> int: ...

    def _senior(self) -> int | None:
        """The owner of the oldest request in flight (placed, not finished), as the engine
        tells the gManager."""
        reqs = self.requests
        while self._oldest < len(reqs) and reqs[self._oldest].status in _DONE:
            self._oldest += 1
        return reqs[self._oldest].owner if self._oldest < len(reqs) else None

    def senior_id(self) -> str | None:
        """The id of the oldest request in flight, if placed (`_senior` called first)."""
        reqs = self.requests
        if self._oldest < len(reqs) and reqs[self._oldest].owner is not None:
            return reqs[self._oldest].request_id
        return None


class Simulator(PlannedCluster):
    """Instances that step at their own pace (`SimInstance`), each step an event in one heap
    with the plan ticks (the module's docstring)."""

    def __init__(self, config: SimConfig, cost: CostModel, trace: Sequence[TraceRequest]) -> None:
        super().__init__(config, cost, trace)
        self.instances = [SimInstance(i, config.max_batched_tokens, config.max_num_seqs,
                                      config.max_stall_steps) for i in range(config.num_instances)]
        self._heartbeats = [self._heartbeat(i) for i in range(config.num_instances)]
        self._idle_with_work: set[int] = set()
        self._heap: list[tuple[float, int, int]] = []
        self._seq = 0
        self._last_step_s = 0.0

    def run(self) -> SimResult:
        start = time.perf_counter()
        if self.requests:
            self._push(self._tick_after(0.0, self.requests[0].arrival_s), _PLAN)
        while self._heap:
            t, _, kind = heapq.heappop(self._heap)
            if kind == _PLAN:
                self._tick(t)
            else:
                self._step(kind, t)
        self.ledger.check()
        self.result.num_preemptions = sum(i.num_preemptions for i in self.instances)
        self.result.wall_s = time.perf_counter() - start
        return self.result

    def _push(self, t: float, kind: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind))

    def _tick_after(self, now: float, t: float) -> float:
        """The first tick on the plan grid at or after `t` (and after `now`)."""
        dt = self.config.plan_interval_s
        return now + dt * max(1, math.ceil((t - now) / dt - 1e-9))

    def _tick(self, t: float) -> None:
        wake = self._plan(t) | self._idle_with_work
        for i in sorted(wake):
            if not self.instances[i].busy:
                self._step(i, t)
        if self._in_flight and t - self._last_step_s > self.config.stuck_after_s:
            raise RuntimeError(f"simulation stuck at t={t:.1f}s: {self._in_flight} requests in "
                               f"flight and no step for {self.config.stuck_after_s}s")
        if self._in_flight:
            self._push(t + self.config.plan_interval_s, _PLAN)
        elif self._next_arrival < len(self.requests):
            self._push(self._tick_after(t, self.requests[self._next_arrival].arrival_s), _PLAN)

    def _place(self, req: SimRequest, i: int) -> None:
        self.instances[i].waiting.append(req)

    def _heartbeat(self, i: int) -> Heartbeat:
        return self.instances[i].heartbeat(self.ledger)

    def _num_sampled(self) -> int:
        return sum(inst.num_sampled for inst in self.instances)

    def _step(self, i: int, t: float) -> None:
        """Instance i's step ends at t (or it wakes at t): account it and start the next one."""
        inst, ledger = self.instances[i], self.ledger
        self._in_flight -= len(inst.finish_step(t, ledger))
        self.dirty.add(i)
        if self._migrations[i]:
            self._apply_migrations(i)
        inst.schedule(ledger)
        if inst.batch:
            inst.busy = True
            self._idle_with_work.discard(i)
            self._push(t + self._step_time(inst), i)
            self._last_step_s = t
            self.result.num_steps += 1
        else:
            inst.busy = False
            if inst.has_work:
                self._idle_with_work.add(i)
            else:
                self._idle_with_work.discard(i)

    def _apply_migrations(self, i: int) -> None:
        for m in self._migrations[i]:
            req = self._by_id[m.request_id]
            if req.status is not Status.RUNNING or req.owner != i:
                continue  # finished or preempted since the plan
            moved = self.ledger.migrate(req, m.source, m.target)
            if moved:
                s = self.cost.per_exchange_byte_s * moved * self._kv_block_bytes
                self.instances[m.source].extra_s += s
                self.instances[m.target].extra_s += s
                self.result.num_migrations += 1
                self.result.migrated_blocks += moved
        self._migrations[i].clear()

    def _step_time(self, inst: SimInstance) -> float:
        """Cost model over the batch; charges creditors for the attention they compute for us.

        A request's context (computed tokens plus this step's) is split over the instances
        holding its blocks in proportion to their blocks.
        """
        me, cost = inst.index, self.cost
        local = 0.0
        remote: dict[int, float] = {}
        exchange_tokens = 0
        tokens = 0
        for req, n in inst.batch:
            tokens += n
            context = req.num_computed + n
            blocks = req.blocks
            if len(blocks) == 1:
                local += context
                continue
            per_block = context / req.num_blocks
            for j, b in blocks.items():
                if j == me:
                    local += b * per_block
                else:
                    remote[j] = remote.get(j, 0.0) + b * per_block
                    exchange_tokens += n
        attention_tokens = local
        if remote:
            attention_tokens = max(local, max(remote.values()))
            for j, t in remote.items():
                self.instances[j].extra_s += cost.per_kv_byte_s * t * cost.kv_bytes_per_token
        s = cost.step_s(tokens, round(attention_tokens * cost.kv_bytes_per_token),
                        exchange_tokens * cost.exchange_bytes_per_token) + inst.extra_s
        inst.extra_s = 0.0
        return s


def simulate(config: SimConfig, cost: CostModel, trace: Sequence[TraceRequest]) -> SimResult:
    return Simulator(config, cost, trace).run()
