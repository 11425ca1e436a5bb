"""One simulated instance: continuous batching with chunked prefill and preemption by recompute.

The asynchronous simulator's own policy, in the engine's token counts but not by its rules (the
lockstep simulator runs the engine's scheduler itself). Running requests go first in admission
order, each taking `min(uncomputed, budget)` tokens; when the ledger has no block for one, the
most recently admitted request behind it is preempted (KV dropped, recomputed later). If none is
behind it, the request sits this step out holding its blocks (it waits for a lease), and after
`max_stall_steps` such steps in a row with nothing else running it is preempted too, so that
requests stalled on several instances can't hold each other's memory forever.

Waiting requests are admitted in steps without preemption, while budget and seats remain, and
only when blocks for their whole remaining prompt are available now (local or leased); they are
reserved at once, so a long prompt never stalls halfway through its prefill when a lease
expires. One that doesn't fit keeps its place while up to `max_skipped` of those behind it are
tried (backfill): an instance whose queue head waits for a lease keeps its memory busy
meanwhile, and the head's need keeps pulling leases from the gManager.
"""

from __future__ import annotations

from collections import deque

from infinite_llm.cluster.gmanager import Heartbeat
from infinite_llm.sim.ledger import BlockLedger
from infinite_llm.sim.request import SimRequest, Status


class SimInstance:
    def __init__(self, index: int, max_batched_tokens: int, max_num_seqs: int,
                 max_stall_steps: int = 8, max_skipped: int = 4) -> None:
        self.index = index
        self.max_batched_tokens = max_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_stall_steps = max_stall_steps
        self.max_skipped = max_skipped  # waiting requests that may be passed over per step
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.batch: list[tuple[SimRequest, int]] = []  # in flight: (request, tokens)
        self.batch_tokens = 0
        self.busy = False  # a step end is scheduled
        self.extra_s = 0.0  # work for others (remote attention, migrations) paid in our next step
        self.stalled_steps = 0
        self.num_stalled = 0  # running requests that found no block in the last step
        self.num_preemptions = 0
        self.num_sampled = 0  # output tokens sampled so far

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self, ledger: BlockLedger) -> None:
        """Pick the next batch and reserve its KV slots."""
        me, budget, running = self.index, self.max_batched_tokens, self.running
        batch: list[tuple[SimRequest, int]] = []
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.prompt_len + req.num_output - req.num_computed, budget)
            ok = ledger.grow(req, me, n)
            while not ok and len(running) > i + 1:
                self._preempt(running.pop(), ledger)
                preempted = True
                ok = ledger.grow(req, me, n)
            if ok:
                batch.append((req, n))
                budget -= n
            i += 1
        self.num_stalled = i - len(batch)
        if not batch and running:
            self.stalled_steps += 1
            if self.stalled_steps > self.max_stall_steps:
                self._preempt(running.pop(), ledger)
                preempted = True
        else:
            self.stalled_steps = 0
        if not preempted and self.waiting:
            budget = self._admit(ledger, batch, budget)
        self.batch = batch
        self.batch_tokens = self.max_batched_tokens - budget

    def _admit(self, ledger: BlockLedger, batch: list[tuple[SimRequest, int]],
               budget: int) -> int:
        """Admit waiting requests in order; one that doesn't fit yet keeps its place (backfill)."""
        me, running = self.index, self.running
        kept: list[SimRequest] = []
        waiting = self.waiting
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            req = waiting.popleft()
            if ledger.blocks_for(req, req.num_uncomputed) > ledger.available(me):
                kept.append(req)
                if len(kept) > self.max_skipped:
                    break
                continue
            ledger.grow(req, me, req.num_uncomputed)  # the whole prompt: no stall mid-prefill
            n = min(req.num_uncomputed, budget)
            req.status = Status.RUNNING
            running.append(req)
            batch.append((req, n))
            budget -= n
        waiting.extendleft(reversed(kept))
        return budget

    def _preempt(self, req: SimRequest, ledger: BlockLedger) -> None:
        ledger.release(req)
        req.num_computed = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def finish_step(self, now: float, ledger: BlockLedger) -> list[SimRequest]:
        """Account the batch that just ran: sample where prompts are done; return the finished."""
        done = []
        for req, n in self.batch:
            req.num_computed += n
            if req.num_computed == req.prompt_len + req.num_output:
                req.num_output += 1
                self.num_sampled += 1
                if req.first_token_s is None:
                    req.first_token_s = now
                if req.num_output == req.output_len:
                    req.finish_s = now
                    req.status = Status.FINISHED
                    ledger.release(req)
                    done.append(req)
        if done:
            self.running = [r for r in self.running if r.status is Status.RUNNING]
        self.batch = []
        return done

    def heartbeat(self, ledger: BlockLedger) -> Heartbeat:
        me = self.index
        waiting = sum(r.prompt_len + r.num_output - r.num_computed for r in self.waiting)
        head = self.waiting[0].num_uncomputed if self.waiting else 0
        prefill = 0  # admission reserved whole prompts: count only what blocks don't yet hold
        held = []
        lenders: dict[int, int] = {}
        for r in self.running:
            for j, b in r.blocks.items():
                if j != me:
                    lenders[j] = lenders.get(j, 0) + b
            if r.num_uncomputed > 1:
                prefill += max(0, r.prompt_len + r.num_output - r.num_blocks * ledger.block_size)
            n = r.blocks.get(me)
            if n:
                held.append((r.request_id, n))
        held.sort(key=lambda rb: -rb[1])
        return Heartbeat(
            instance=me, total_blocks=ledger.total, free_blocks=ledger.free[me],
            own_blocks=ledger.own[me], lent_blocks=ledger.lent[me],
            borrowed_blocks=ledger.borrowed[me], num_running=len(self.running),
            num_waiting=len(self.waiting), batch_tokens=self.batch_tokens,
            request_blocks=tuple(held), prefill_tokens=prefill, waiting_tokens=waiting,
            head_tokens=head, lenders=tuple(sorted(lenders, key=lambda j: (-lenders[j], j))),
            num_stalled=self.num_stalled)
