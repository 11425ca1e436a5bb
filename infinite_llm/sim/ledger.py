"""Block accounting of every simulated instance: the simulator's rManagers, in one place.

Per instance: `free + own + lent == total` after every call. `own` blocks hold KV of requests the
instance owns; `lent` blocks hold KV of other instances' requests or are set aside for them under
a lease; `borrowed` counts our requests' blocks hosted elsewhere, so sum(borrowed) equals the lent
blocks in use. `credit[d][c]` is what creditor c still sets aside for debtor d; it returns to c
when the lease expires (`expire_credit`, before every plan). Every mutation marks the instances it
touched in `dirty`, so the simulator rebuilds only their heartbeats.
"""

from __future__ import annotations

from infinite_llm.cluster.gmanager import Lease
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
            self.free[owner] -= local
            self.own[owner] += local
            blocks[owner] = blocks.get(owner, 0) + local
        rest = need - local
        if rest:
            credit = self.credit[owner]
            for creditor in sorted(credit, key=lambda c: (-credit[c], c)):
                take = min(rest, credit[creditor])
                credit[creditor] -= take
                blocks[creditor] = blocks.get(creditor, 0) + take
                self.borrowed[owner] += take
                rest -= take
                if rest == 0:
                    break
        req.num_blocks += need
        self.dirty.add(owner)
        return True

    def release(self, req: SimRequest) -> None:
        """Every block of the request goes back to the free list of the instance holding it."""
        owner = req.owner
        for instance, n in req.blocks.items():
            if instance == owner:
                self.own[instance] -= n
            else:
                self.lent[instance] -= n
                self.borrowed[owner] -= n
                self.dirty.add(instance)
            self.free[instance] += n
        self.dirty.add(owner)
        req.blocks.clear()
        req.num_blocks = 0

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

    def migrate(self, req: SimRequest, source: int, target: int) -> int:
        """Move the request's blocks on `source` to `target`; 0 if target hasn't room for them."""
        n = req.blocks.get(source, 0)
        if n == 0 or self.free[target] < n or source == target:
            return 0
        owner = req.owner
        for instance, delta in ((source, -n), (target, n)):
            self.free[instance] -= delta
            if instance == owner:
                self.own[instance] += delta
            else:
                self.lent[instance] += delta
                self.borrowed[owner] += delta
        del req.blocks[source]
        req.blocks[target] = req.blocks.get(target, 0) + n
        self.dirty.update((source, target, owner))
        return n

    def check(self) -> None:
        """Raise if the invariants are broken (tests and the end of every run call this)."""
        for i, (f, o, le) in enumerate(zip(self.free, self.own, self.lent)):
            if min(f, o, le) < 0 or f + o + le != self.total:
                raise RuntimeError(f"instance {i}: free {f} + own {o} + lent {le} != {self.total}")
        reserved = sum(sum(c.values()) for c in self.credit)
        if sum(self.borrowed) + reserved != sum(self.lent):
            raise RuntimeError("borrowed + reserved blocks != lent blocks")
