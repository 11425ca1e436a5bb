"""Block accounting of every simulated instance: the simulator's rManagers, in one place.

Per instance: `free + own + lent == total` after every call. `own` blocks hold KV of requests the
instance owns; `lent` blocks hold KV of other instances' requests or are set aside for them under
a lease; `borrowed` counts our requests' blocks hosted elsewhere, so sum(borrowed) equals the lent
blocks in use. `credit[d][c]` is what creditor c still sets aside for debtor d; it returns to c
when the lease expires (`expire_credit`, before every plan). Every mutation marks the instances it
touched in `dirty`, so the simulator rebuilds only their heartbeats.

Two kinds of request keep their blocks here: the asynchronous simulator's `SimRequest`s (`grow`,
`release`, `migrate`: a count per instance) and, through `InstanceBlocks`, the engine `Request`s
that the lockstep simulator's instances schedule with the engine's own scheduler (segments, as
`RManager` keeps them). Both move blocks with the same three counts (`take`, `give_back`,
`move`).
"""

from __future__ import annotations

from infinite_llm.cluster.gmanager import Lease
from infinite_llm.request import Request, Segment
from infinite_llm.sim.request import SimRequest


class BlockLedger:
    def __init__(self, num_instances: int, blocks_per_instance: int, block_size: int,
                 dirty: set[int]) -> None:
        self.total = blocks_per_instance
        self.block_size = block_size
        self.free = [blocks_per_instance] * num_instances
        self.own = [0] * num_instances
        self.lent = [0] * num_instances
        self.borrowed = [0] * num_instances
        self.credit: list[dict[int, int]] = [{} for _ in range(num_instances)]
        self.dirty = dirty
        self._debtors: set[int] = set()  # instances holding unexpired credit
        self._freed_on_creditor = False  # since the last expiry (the engine's next plan)

    def available(self, instance: int) -> int:
        """Blocks the instance can take now: local free plus what its leases still set aside."""
        credit = self.credit[instance]
        return self.free[instance] + (sum(credit.values()) if credit else 0)

    def blocks_for(self, req: SimRequest, num_tokens: int) -> int:
        return max(0, -(-(req.num_computed + num_tokens) // self.block_size) - req.num_blocks)

    def grow(self, req: SimRequest, owner: int, num_tokens: int) -> bool:
        """Slots for the request's next `num_tokens`: local blocks, then leases; else False."""
        need = self.blocks_for(req, num_tokens)
        if need == 0:
            return True
        local = min(need, self.free[owner])
        if local < need and self.available(owner) < need:
            return False
        blocks = req.blocks
        if local:
            self.take(owner, owner, local)
            blocks[owner] = blocks.get(owner, 0) + local
        rest = need - local
        if rest:
            credit = self.credit[owner]
            for creditor in sorted(credit, key=lambda c: (-credit[c], c)):
                n = min(rest, credit[creditor])
                self.take(owner, creditor, n)
                blocks[creditor] = blocks.get(creditor, 0) + n
                rest -= n
                if rest == 0:
                    break
        req.num_blocks += need
        return True

    def release(self, req: SimRequest) -> None:
        """Every block of the request goes back to the free list of the instance holding it."""
        for instance, n in req.blocks.items():
            self.give_back(req.owner, instance, n)
        self.dirty.add(req.owner)
        req.blocks.clear()
        req.num_blocks = 0

    def take(self, owner: int, instance: int, n: int) -> None:
        """`n` blocks of `instance` start holding KV of `owner`'s request: its own free ones,
        or ones a creditor set aside for it."""
        if instance == owner:
            self.free[owner] -= n
            self.own[owner] += n
        else:
            self.credit[owner][instance] -= n
            self.borrowed[owner] += n
        self.dirty.add(owner)

    def give_back(self, owner: int, instance: int, n: int) -> None:
        """`n` blocks of `instance` holding KV of `owner`'s request are free again."""
        if instance == owner:
            self.own[instance] -= n
        else:
            self.lent[instance] -= n
            self.borrowed[owner] -= n
            self.dirty.add(instance)
            self._freed_on_creditor = True
        self.free[instance] += n

    def move(self, owner: int, source: int, target: int, n: int) -> None:
        """`n` blocks of `owner`'s request move from `source` to free blocks of `target`."""
        for instance, delta in ((source, -n), (target, n)):
            self.free[instance] -= delta
            if instance == owner:
                self.own[instance] += delta
            else:
                self.lent[instance] += delta
                self.borrowed[owner] += delta
        self.dirty.update((source, target, owner))

    def lend(self, lease: Lease) -> None:
        c, d, n = lease.creditor, lease.debtor, lease.num_blocks
        if not 0 < n <= self.free[c] or c == d:
            raise ValueError(f"lease {lease} but creditor has {self.free[c]} free blocks")
        self.free[c] -= n
        self.lent[c] += n
        self.credit[d][c] = self.credit[d].get(c, 0) + n
        self._debtors.add(d)
        self.dirty.update((c, d))

    def expire_credit(self) -> None:
        for d in self._debtors:
            for c, n in self.credit[d].items():
                self.free[c] += n
                self.lent[c] -= n
                self.dirty.add(c)
            self.credit[d].clear()
        self._debtors.clear()
        self._freed_on_creditor = False

    def creditors_to_tell(self) -> bool:
        """Whether, since the last expiry, blocks were freed on a creditor or lease room is
        still unused: what each engine instance's `RManager.end_step` hands its creditors
        through the next plan, for which the engine steps once more even with nothing to run."""
        return self._freed_on_creditor or any(any(self.credit[d].values()) for d in self._debtors)

    def migrate(self, req: SimRequest, source: int, target: int) -> int:
        """Move the request's blocks on `source` to `target`; 0 if target hasn't room for them."""
        n = req.blocks.get(source, 0)
        if n == 0 or self.free[target] < n or source == target:
            return 0
        self.move(req.owner, source, target, n)
        del req.blocks[source]
        req.blocks[target] = req.blocks.get(target, 0) + n
        return n

    def check(self) -> None:
        """Raise if the invariants are broken (tests and the end of every run call this)."""
        for i, (f, o, le) in enumerate(zip(self.free, self.own, self.lent)):
            if min(f, o, le) < 0 or f + o + le != self.total:
                raise RuntimeError(f"instance {i}: free {f} + own {o} + lent {le} != {self.total}")
        reserved = sum(sum(c.values()) for c in self.credit)
        if sum(self.borrowed) + reserved != sum(self.lent):
            raise RuntimeError("borrowed + reserved blocks != lent blocks")


class InstanceBlocks:
    """The ledger as one instance's `BlockAllocator` (`infinite_llm.kvcache.allocator`), for
    the engine `Request`s it owns: what `RManager` is to an engine instance, so that the
    engine's scheduler runs on a simulated one. New blocks go where `RManager.reserve` puts
    them: the instance of the request's tail segment, then this instance, then the creditors
    with most room left under this step's leases; each change of instance starts a segment.
    Segments hold counts only: no block ids are simulated."""

    def __init__(self, ledger: BlockLedger, instance: int) -> None:
        self.ledger = ledger
        self.instance = instance

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        held = sum(s.num_blocks for s in request.segments)
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.ledger.block_size) - held)

    def reserve(self, request: Request, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(request, num_new_tokens)
        if needed == 0:
            return True
        if needed > self.available_blocks():
            return False
        me, free, credit = self.instance, self.ledger.free, self.ledger.credit[self.instance]
        tail = request.segments[-1].instance if request.segments else None
        creditors = sorted((c for c, n in credit.items() if n > 0), key=lambda c: (-credit[c], c))
        for instance in dict.fromkeys([tail, me, *creditors]):  # keeps order, drops repeats
            if instance is None:
                continue
            n = min(free[me] if instance == me else credit.get(instance, 0), needed)
            if n > 0:
                self._place(request, instance, n)
                needed -= n
            if needed == 0:
                break
        return True

    def _place(self, request: Request, instance: int, n: int) -> None:
        segments = request.segments
        if not segments or segments[-1].instance != instance:
            start = sum(s.num_blocks for s in segments) * self.ledger.block_size
            segments.append(Segment(instance, start))
        segments[-1].num_blocks += n
        self.ledger.take(self.instance, instance, n)

    def free(self, request: Request) -> None:
        for segment in request.segments:
            self.ledger.give_back(self.instance, segment.instance, segment.num_blocks)
        self.ledger.dirty.add(self.instance)
        request.segments.clear()

    def available_blocks(self) -> int:
        return self.ledger.available(self.instance)

    def migrate_out(self, request: Request, target: int) -> int:
        """Move the request's segments on this instance to `target`, as `RManager.migrate_out`
        does once their KV is sent; returns the blocks moved (0 if target hasn't room)."""
        moved = [s for s in request.segments if s.instance == self.instance]
        n = sum(s.num_blocks for s in moved)
        if n == 0 or self.ledger.free[target] < n:
            return 0
        self.ledger.move(self.instance, self.instance, target, n)
        for segment in moved:
            segment.instance = target
        return n
