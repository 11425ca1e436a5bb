"""gManager: the cluster-wide policy of Infinite-LLM, a pure function from heartbeats to a plan.

No torch, no I/O, no state between calls: the engine (rank 0) and the simulator call `plan` with
every instance's latest heartbeat and the requests that arrived since, and apply the `Plan`.
Every choice is a sort or heap on stable keys ending in the instance index, so the same inputs
give the same plan whatever the order of the heartbeats. The policy, in the order applied:

1. **Demand**: blocks needed over the next steps: `lookahead_tokens` per running request, the
   unheld rest of partial prefills, and the queue as far as the next steps admit it (the head
   whole, then up to `queue_window_tokens`), this plan's placements included.
2. **Placement**: in arrival order, to the most free blocks net of the *whole* queue's needs,
   then the fewest requests (running + waiting), then the lowest index. A request larger than
   any instance's free memory is placed all the same: it will borrow.
3. **Debtors and creditors** (pooling only): demand above free blocks means preempting or a
   waiting queue, so a shrinking batch: a *debtor* owes the shortfall (at most
   `max_lease_blocks`). A *creditor* has attention time to spare (batch below
   `efficient_batch_tokens`) and memory: `free - demand - reserve_blocks > 0`, what it may lend,
   never more than its free blocks. A debtor's spare is negative, so no instance is both.
4. **Migrations**: a debtor with a waiting queue is blocked by the requests holding its memory;
   its largest request (of `min_migration_blocks` or more) that fits the largest credit moves
   there whole. One per debtor, `max_migrations` per plan, largest debt first.
5. **Idle memory first**: a debtor with nothing running (its queue head needs more than it has)
   is *stranded*; stranded debtors are served first, smallest debt first. When credit can't
   cover the smallest, the stranded with the largest debts lend `free - reserve` instead, else
   instances whose heads all exceed one instance a little would wait on each other forever.
6. **Leases**: largest debt first (after the stranded), each covered whole from the largest
   credits, several if need be, since a queue head needs its whole prompt; debts the credit
   can't cover share the rest in a second pass. A debtor borrows first from the creditors that
   already host its KV (its `lenders`, sticky): a long request grows one segment per creditor
   instead of a new one each time the largest credit moves. A (debtor, creditor) pair appears
   at most once.
7. **Without `lend_to_running`** (where exchanging costs more than the batch it adds): nothing
   migrates, and an instance with requests running is lent only what it was promised (the rest
   of prompts admitted on a lease; decode growth of requests already borrowing). Idle instances
   and the senior are lent to as above.

**Seniority** comes before all of it (pooling only): when the instance owning the cluster's
oldest request (`senior`, from the caller, who knows arrival order) is stuck (a running request
found no block, or nothing runs), it is lent what its running requests need (or its queue head,
if none runs) from every other instance's free memory, whatever those instances' own queues
want, since they only serve younger requests; an instance that lends to it is not a debtor in
this plan. Without this, two requests that each outgrow one instance and together
outgrow the cluster take each other's blocks forever (each preempts itself when stuck, frees,
and the other one's owner is left with no credit to borrow). The engine's scheduler never
preempts the oldest request, so it holds what it gets and finishes; then the next oldest does.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One instance's state after its latest step. Invariant: free + own + lent == total."""

    instance: int
    total_blocks: int
    free_blocks: int
    own_blocks: int
    lent_blocks: int  # hosting other instances' requests (or set aside for them)
    borrowed_blocks: int  # our requests' blocks hosted elsewhere
    num_running: int
    num_waiting: int
    batch_tokens: int  # tokens computed in the last step
    # (request_id, blocks it holds on this instance) for the requests this instance owns
    request_blocks: tuple[tuple[str, int], ...] = ()
    prefill_tokens: int = 0  # prompt tokens of running requests that no KV slot holds yet
    waiting_tokens: int = 0  # tokens to compute for the whole waiting queue
    head_tokens: int = 0  # tokens to compute for the first waiting request
    lenders: tuple[int, ...] = ()  # instances hosting our requests' KV, most blocks first
    num_stalled: int = 0  # running requests that found no block in the last step


@dataclass(frozen=True, slots=True)
class NewRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Placement:
    request_id: str
    instance: int


@dataclass(frozen=True, slots=True)
class Lease:
    """The creditor sets `num_blocks` aside for the debtor's requests until the next plan.

    They count as lent at once; the debtor's new KV goes to its own blocks first, then to its
    leases; the unused rest goes back before the next plan, and blocks taken stay lent until
    their request frees them. So a heartbeat's `free_blocks` is memory nobody was promised.
    """

    debtor: int
    creditor: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class Migration:
    """Move the request's `num_blocks` held on `source` (all layers) to `target` at a step end."""

    request_id: str
    source: int
    target: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class Plan:
    placements: tuple[Placement, ...] = ()
    leases: tuple[Lease, ...] = ()
    migrations: tuple[Migration, ...] = ()


@dataclass(frozen=True, slots=True)
class GManagerConfig:
    block_size: int
    efficient_batch_tokens: int  # below this many tokens per step an instance is under-used
    reserve_blocks: int = 0  # headroom a creditor keeps for itself
    max_lease_blocks: int = 1 << 30  # the most one debtor is lent per plan
    lookahead_tokens: int = 16  # decode tokens per running request that demand covers
    queue_window_tokens: int = 256  # queued tokens the next steps admit (>= the queue head)
    max_migrations: int = 2  # per plan
    min_migration_blocks: int = 4  # smaller requests are not worth moving
    # False where a step in which anyone computes over remote KV costs the cluster more than
    # the batch a lease adds (lockstep instances on CPU over gloo: such a step costs every
    # instance two all_to_alls per layer, ~3 busy instances' work): then only instances with
    # nothing running and the senior borrow, so that pooling serves what one instance can't
    # hold without making ordinary steps exchange.
    lend_to_running: bool = True
    pooling: bool = True  # False: placements only (static mode, independent replicas)

    def __post_init__(self) -> None:
        for name, low in (("block_size", 1), ("efficient_batch_tokens", 1),
                          ("max_lease_blocks", 1), ("min_migration_blocks", 1),
                          ("reserve_blocks", 0), ("lookahead_tokens", 0),
                          ("queue_window_tokens", 0), ("max_migrations", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"GManagerConfig.{name} must be >= {low}, "
                                 f"got {getattr(self, name)}")


class GManager:
    def __init__(self, config: GManagerConfig) -> None:
        self.config = config

    def demand_blocks(self, hb: Heartbeat, placed: Sequence[int] = (),
                      whole_queue: bool = False) -> int:
        """Blocks the instance's requests need over the next steps, or for its whole queue.

        `placed` are the prompt lengths of requests placed on it in this plan (queued after the
        heartbeat's). The next steps admit the queue head whole and then up to
        `queue_window_tokens`; what lies further back doesn't need memory yet.
        """
        cfg = self.config
        waiting = hb.waiting_tokens + sum(placed)
        head = hb.head_tokens if hb.num_waiting else (placed[0] if placed else 0)
        queued = waiting if whole_queue else min(waiting, max(head, cfg.queue_window_tokens))
        tokens = hb.num_running * cfg.lookahead_tokens + hb.prefill_tokens + queued
        return -(-tokens // cfg.block_size)

    def plan(self, heartbeats: Sequence[Heartbeat], new_requests: Sequence[NewRequest],
             senior: int | None = None) -> Plan:
        """The plan for the next step; `senior` is the instance owning the cluster's oldest
        unfinished request (None: no seniority)."""
        hbs = sorted(heartbeats, key=lambda h: h.instance)
        if len({h.instance for h in hbs}) != len(hbs):
            raise ValueError("two heartbeats for one instance")
        if not hbs:
            if new_requests:
                raise ValueError("new requests but no instance to place them on")
            return Plan()
        placed: dict[int, list[int]] = {}
        placements = self._place(hbs, new_requests, placed)
        if not self.config.pooling:
            return Plan(placements=placements)
        debts, credits = self._ledger(hbs, placed)
        free = {h.instance: h.free_blocks for h in hbs}
        leases = self._serve_senior(hbs, senior, placed, debts, credits, free)
        migrations: tuple[Migration, ...] = ()
        if self.config.lend_to_running:
            migrations = self._migrate(hbs, debts, credits)
        else:
            self._keep_promises(hbs, debts, free)
        first = self._unstrand(hbs, debts, credits, free, {lease.debtor for lease in leases})
        lenders = {h.instance: h.lenders for h in hbs}
        leases += self._lease(debts, credits, first, lenders)
        return Plan(placements, _merge(leases), migrations)

    def _place(self, hbs: list[Heartbeat], new_requests: Sequence[NewRequest],
               placed: dict[int, list[int]]) -> tuple[Placement, ...]:
        """Most net free blocks (whole queue counted), then fewest requests, then lowest index."""
        heap = [(self.demand_blocks(h, whole_queue=True) - h.free_blocks,
                 h.num_running + h.num_waiting, h.instance) for h in hbs]
        heapq.heapify(heap)
        placements = []
        for req in new_requests:
            neg_net_free, load, instance = heapq.heappop(heap)
            blocks = -(-req.num_prompt_tokens // self.config.block_size)
            heapq.heappush(heap, (neg_net_free + blocks, load + 1, instance))
            placed.setdefault(instance, []).append(req.num_prompt_tokens)
            placements.append(Placement(req.request_id, instance))
        return tuple(placements)

    def _ledger(self, hbs: list[Heartbeat],
                placed: dict[int, list[int]]) -> tuple[dict[int, int], dict[int, int]]:
        """Debt (shortfall, capped) of every debtor and credit (spare) of every creditor."""
        cfg = self.config
        debts: dict[int, int] = {}
        credits: dict[int, int] = {}
        for h in hbs:
            need = self.demand_blocks(h, placed.get(h.instance, ()))
            if need > h.free_blocks:
                debts[h.instance] = min(need - h.free_blocks, cfg.max_lease_blocks)
            elif h.batch_tokens < cfg.efficient_batch_tokens:
                spare = h.free_blocks - need - cfg.reserve_blocks
                if spare > 0:
                    credits[h.instance] = spare
        return debts, credits

    def _serve_senior(self, hbs: list[Heartbeat], senior: int | None,
                      placed: dict[int, list[int]], debts: dict[int, int],
                      credits: dict[int, int], free: dict[int, int]) -> list[Lease]:
        """Lend a stuck senior instance what its running requests (or its queue head) lack,
        from the instances it already borrows from, then the most free; lenders stop being
        debtors."""
        if senior not in debts:
            return []
        cfg = self.config
        h = next(h for h in hbs if h.instance == senior)
        if h.num_running:
            if not h.num_stalled:
                return []
            tokens = h.num_running * cfg.lookahead_tokens + h.prefill_tokens
        else:
            tokens = h.head_tokens if h.num_waiting else sum(placed.get(senior, [])[:1])
        need = min(debts[senior], -(-tokens // cfg.block_size) - h.free_blocks)
        others = sorted((i for i in free if i != senior), key=lambda i: (-free[i], i))
        sticky = [i for i in h.lenders if i in free and i != senior]
        leases = []
        for creditor in dict.fromkeys(sticky + others):
            if need <= 0:
                break
            n = min(need, free[creditor] - cfg.reserve_blocks)
            if n <= 0:
                continue
            leases.append(Lease(senior, creditor, n))
            need -= n
            debts[senior] -= n
            free[creditor] -= n
            debts.pop(creditor, None)
            spare = min(credits.get(creditor, 0), free[creditor] - cfg.reserve_blocks)
            if spare > 0:
                credits[creditor] = spare
            else:
                credits.pop(creditor, None)
        if debts[senior] <= 0:
            del debts[senior]
        return leases

    def _keep_promises(self, hbs: list[Heartbeat], debts: dict[int, int],
                       free: dict[int, int]) -> None:
        """Without lending to running instances, an instance with requests running owes only
        what it was promised: the unheld rest of prompts admitted on a lease, and the decode
        growth of requests already on borrowed blocks (their steps exchange anyway). Else a
        long request admitted on a one-step lease finds no block for its next chunk."""
        cfg = self.config
        for h in hbs:
            if h.instance not in debts or not h.num_running:
                continue
            growth = h.num_running * cfg.lookahead_tokens if h.borrowed_blocks else 0
            owed = -(-(h.prefill_tokens + growth) // cfg.block_size) - free[h.instance]
            if owed > 0:
                debts[h.instance] = min(debts[h.instance], owed)
            else:
                del debts[h.instance]

    def _migrate(self, hbs: list[Heartbeat], debts: dict[int, int],
                 credits: dict[int, int]) -> tuple[Migration, ...]:
        """Move a blocked debtor's largest request that fits the largest credit there."""
        cfg = self.config
        by_instance = {h.instance: h for h in hbs}
        migrations: list[Migration] = []
        target = min(credits, key=lambda i: (-credits[i], i), default=None)
        for debtor in sorted(debts, key=lambda i: (-debts[i], i)):
            if len(migrations) >= cfg.max_migrations or target is None:
                break
            hb = by_instance[debtor]
            if hb.num_waiting == 0:
                continue
            fits = [(rid, n) for rid, n in hb.request_blocks
                    if cfg.min_migration_blocks <= n <= credits[target]]
            if fits:
                request_id, blocks = min(fits, key=lambda rb: (-rb[1], rb[0]))
                migrations.append(Migration(request_id, debtor, target, blocks))
                credits[target] -= blocks
                if credits[target] == 0:
                    del credits[target]
                debts[debtor] -= min(blocks, debts[debtor])
                target = min(credits, key=lambda i: (-credits[i], i), default=None)
        return tuple(migrations)

    def _unstrand(self, hbs: list[Heartbeat], debts: dict[int, int], credits: dict[int, int],
                  free: dict[int, int], borrowers: set[int]) -> list[int]:
        """Stranded debtors to serve first; turns the furthest-from-running ones into creditors
        (never one already lent to in this plan: the senior)."""
        idle = {h.instance: free[h.instance] for h in hbs
                if h.num_running == 0 and h.instance not in borrowers}
        stranded = sorted((i for i in debts if i in idle), key=lambda i: (debts[i], i))
        pool = sum(credits.values())
        first = []
        while stranded:
            debtor = stranded[0]
            while pool < debts[debtor] and len(stranded) > 1:
                lender = stranded.pop()
                del debts[lender]
                spare = idle[lender] - self.config.reserve_blocks
                if spare > 0:
                    credits[lender] = spare
                    pool += spare
            if pool < debts[debtor]:
                break
            first.append(stranded.pop(0))
            pool -= debts[debtor]
        return first

    def _lease(self, debts: dict[int, int], credits: dict[int, int], first: list[int],
               lenders: dict[int, tuple[int, ...]]) -> list[Lease]:
        """Cover whole debts, `first` then largest debt first, from the debtor's own lenders and
        then the largest credits; then spread the rest over the debts left uncovered."""
        credits = {i: c for i, c in credits.items() if c > 0}
        heap = [(-c, i) for i, c in credits.items()]
        heapq.heapify(heap)
        total = sum(credits.values())
        leases: list[Lease] = []
        firsts = set(first)
        order = first + sorted((i for i in debts if i not in firsts), key=lambda i: (-debts[i], i))
        skipped = []
        for debtor in order:
            if debts[debtor] <= 0:
                continue
            if debts[debtor] > total:
                skipped.append(debtor)
                continue
            total -= _cover(debtor, debts[debtor], lenders[debtor], credits, heap, leases)
        for debtor in skipped:
            if total == 0:
                break
            total -= _cover(debtor, min(debts[debtor], total), lenders[debtor], credits, heap,
                            leases)
        return leases


def _cover(debtor: int, amount: int, sticky: tuple[int, ...], credits: dict[int, int],
           heap: list[tuple[int, int]], leases: list[Lease]) -> int:
    """Lease up to `amount` blocks to the debtor from its `sticky` lenders, then the largest
    credits. `heap` holds (-credit, creditor) entries; one whose credit has since changed is
    stale and skipped (the current one was pushed when it changed)."""
    left = amount

    def take(creditor: int, n: int) -> None:
        nonlocal left
        leases.append(Lease(debtor, creditor, n))
        left -= n
        credits[creditor] -= n
        if credits[creditor]:
            heapq.heappush(heap, (-credits[creditor], creditor))

    for creditor in sticky:
        if left and credits.get(creditor, 0) > 0:
            take(creditor, min(left, credits[creditor]))
    while left and heap:
        neg_credit, creditor = heapq.heappop(heap)
        if credits.get(creditor) == -neg_credit:
            take(creditor, min(left, -neg_credit))
    return amount - left


def _merge(leases: list[Lease]) -> tuple[Lease, ...]:
    """One lease per (debtor, creditor) pair, in order of first appearance."""
    blocks: dict[tuple[int, int], int] = {}
    for lease in leases:
        key = (lease.debtor, lease.creditor)
        blocks[key] = blocks.get(key, 0) + lease.num_blocks
    return tuple(Lease(d, c, n) for (d, c), n in blocks.items())

