"""The rManagers of a small cluster driven through random steps, as the engine drives them.

Each instance has its own `RManager` over a tiny CPU `KVPool`. A step runs as the engine runs it
(`cluster/driver.py: run_plan`): the plan (updates delivered, then leases, aborts, migrations),
then the schedule (owners reserve blocks for their requests, spilling onto creditors under a
lease), the exchange (each creditor hosts the rows owners placed on it, as `lay_out` in
`attention/layout.py` calls `RManager.host`), the finishes (owners free), and `end_step`, whose
`CreditorUpdate`s the next plan delivers. The machine keeps its own record of what the cluster
was told (lease room, blocks placed and not yet hosted, frees not yet delivered) and checks the
rManagers against it after every rule:

* on every instance `free + own + lent == total`, and every block id is in exactly one place
  (free list, an own segment, a hosted segment or a debtor's set-aside);
* for every (owner, creditor) pair, at every point of the step:
  `borrowed + freed_undelivered == hosted + placed_unhosted` (blocks placed count as borrowed
  at once, the creditor hosts them in the exchange; blocks freed stop counting as borrowed at
  once, the creditor frees them when the next plan delivers the update), and the creditor's
  set-aside for the owner equals the owner's unused room there plus `placed_unhosted`. So at the
  start of every plan, with the updates delivered, `borrowed == hosted` exactly and nothing is
  set aside (asserted there as such);
* once every request is freed and the updates delivered, every block is free everywhere.

The engine never frees a request between reserving its blocks and the exchange that hosts them
(preemption only takes requests not yet scheduled in the step; aborts come with the plan): the
machine keeps that order too.
"""

from __future__ import annotations

import enum
from collections import defaultdict

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from infinite_llm.kvcache.pool import KVPool
from infinite_llm.kvcache.rmanager import CreditorUpdate, KVStats, RManager
from infinite_llm.request import Request
from infinite_llm.sampling import SamplingParams


class Phase(enum.Enum):
    PLAN = "plan"  # updates delivered; leases, aborts and migrations may come
    SCHEDULE = "schedule"  # owners reserve; the step's exchange has not run
    FINISH = "finish"  # the exchange has run; requests finish


def make_rmanager(instance: int, num_blocks: int, block_size: int) -> RManager:
    pool = KVPool(num_layers=1, num_blocks=num_blocks, block_size=block_size, num_kv_heads=1,
                  head_dim=1, dtype=torch.float32, device=torch.device("cpu"))
    return RManager(pool, instance)


def make_request(request_id: str, prompt_len: int) -> Request:
    return Request(request_id, [0] * prompt_len, SamplingParams(), 1 << 20, frozenset())


def layout(request: Request) -> list[tuple[int, int, int, tuple[int, ...]]]:
    return [(s.instance, s.start, s.num_blocks, tuple(s.blocks)) for s in request.segments]


def blocks_on(request: Request, instance: int) -> int:
    return sum(s.num_blocks for s in request.segments if s.instance == instance)


class RManagerCluster(RuleBasedStateMachine):
    @initialize(num_instances=st.integers(2, 3), block_size=st.sampled_from([1, 2, 4]),
                sizes=st.lists(st.integers(1, 8), min_size=3, max_size=3))
    def start(self, num_instances: int, block_size: int, sizes: list[int]) -> None:
        self.block_size = block_size
        self.rms = [make_rmanager(i, sizes[i], block_size) for i in range(num_instances)]
        self.requests: dict[str, tuple[int, Request]] = {}  # live: id -> (owner, request)
        self.phase = Phase.PLAN
        self.scheduled: set[str] = set()  # reserved in this step: the step's batch
        self.num_created = 0
        # What the cluster was told, by (owner or debtor, creditor):
        self.room: dict[tuple[int, int], int] = defaultdict(int)  # lease room not yet used
        self.placed: dict[tuple[int, int], int] = defaultdict(int)  # placed, not yet hosted
        self.freed_blocks: dict[tuple[int, int], int] = defaultdict(int)  # not yet delivered
        self.freed_ids: dict[tuple[int, int], list[str]] = defaultdict(list)

    # ---- helpers ---------------------------------------------------------------------------

    def pairs(self) -> list[tuple[int, int]]:
        n = len(self.rms)
        return [(o, c) for o in range(n) for c in range(n) if o != c]

    def borrowed(self, owner: int, creditor: int) -> int:
        # The split by creditor is internal: stats() only gives the sums.
        return self.rms[owner]._borrowed.get(creditor, 0)

    def hosted(self, creditor: int, owner: int) -> int:
        return sum(s.num_blocks for (o, _), segments in self.rms[creditor]._hosted.items()
                   if o == owner for s in segments)

    def set_aside(self, creditor: int, debtor: int) -> int:
        return len(self.rms[creditor]._set_aside.get(debtor, ()))

    # ---- the plan --------------------------------------------------------------------------

    @precondition(lambda self: self.phase is Phase.PLAN
                  and any(rm.pool.num_free for rm in self.rms))
    @rule(data=st.data(), debtor=st.integers(0, 2))
    def lease(self, data: st.DataObject, debtor: int) -> None:
        """The gManager leases free blocks of one or more creditors to a debtor, never more than
        a creditor has free."""
        debtor %= len(self.rms)
        for creditor, rm in enumerate(self.rms):
            if creditor == debtor or rm.pool.num_free == 0:
                continue
            n = data.draw(st.integers(0, rm.pool.num_free), label=f"from {creditor}")
            if n == 0:
                continue
            before = rm.stats()
            rm.grant_lease(debtor, n)
            self.rms[debtor].receive_lease(creditor, n)
            self.room[(debtor, creditor)] += n
            after = rm.stats()
            assert (after.free, after.lent) == (before.free - n, before.lent + n)

    def migrations(self) -> list[tuple[str, int]]:
        """(request, target) pairs the gManager could pick: a request's blocks on its owner
        move only into a target's free memory."""
        return [(rid, t) for rid, (o, r) in sorted(self.requests.items())
                if blocks_on(r, o) > 0
                for t, rm in enumerate(self.rms) if t != o and rm.pool.num_free >= blocks_on(r, o)]

    @precondition(lambda self: self.phase is Phase.PLAN and self.migrations())
    @rule(data=st.data())
    def migrate(self, data: st.DataObject) -> None:
        """The target adopts each segment of the request held on its owner, then the owner
        hands them over (worker/migration.py, without the K/V copy)."""
        request_id, target = data.draw(st.sampled_from(self.migrations()), label="migration")
        owner, request = self.requests[request_id]
        k = blocks_on(request, owner)
        moving = [(s.start, s.num_blocks) for s in request.segments if s.instance == owner]
        before_o, before_t = self.rms[owner].stats(), self.rms[target].stats()
        adopted = [self.rms[target].adopt(owner, request_id, start, n) for start, n in moving]
        assert [len(blocks) for blocks in adopted] == [n for _, n in moving]
        moved = self.rms[owner].migrate_out(request, target)
        assert [(s.instance, s.start, s.num_blocks, s.blocks) for s in moved] == [
            (target, start, n, []) for start, n in moving]
        assert blocks_on(request, owner) == 0
        after_o, after_t = self.rms[owner].stats(), self.rms[target].stats()
        assert (after_o.free, after_o.own, after_o.borrowed) == (
            before_o.free + k, before_o.own - k, before_o.borrowed + k)
        assert (after_t.free, after_t.lent) == (before_t.free - k, before_t.lent + k)

    # ---- the schedule ----------------------------------------------------------------------

    @precondition(lambda self: self.phase is not Phase.FINISH)
    @rule(data=st.data(), num_new_tokens=st.integers(1, 16))
    def reserve(self, data: st.DataObject, num_new_tokens: int) -> None:
        """An owner gives a request (a running one or a new one) slots for its next tokens: all
        of them, placed on its tail's instance, then here, then on creditors by most room; or
        nothing at all."""
        if not self.requests or data.draw(st.booleans(), label="new request"):
            owner = data.draw(st.integers(0, len(self.rms) - 1), label="owner")
            request_id = f"r{self.num_created}"
            self.num_created += 1
            request = make_request(request_id, num_new_tokens)
            self.requests[request_id] = (owner, request)
        else:
            request_id = data.draw(st.sampled_from(sorted(self.requests)), label="request")
            owner, request = self.requests[request_id]
        rm = self.rms[owner]
        bs = self.block_size
        held = sum(s.num_blocks for s in request.segments)
        total_tokens = request.num_computed_tokens + num_new_tokens
        needed = max(0, -(-total_tokens // bs) - held)
        assert rm.blocks_needed(request, num_new_tokens) == needed
        room = {c: self.room[(owner, c)] for c in range(len(self.rms)) if c != owner}
        available = rm.pool.num_free + sum(room.values())
        assert rm.available_blocks() == available
        before_layout, before_stats = layout(request), rm.stats()

        ok = rm.reserve(request, num_new_tokens)

        self.phase = Phase.SCHEDULE
        if not ok:
            assert needed > available
            assert layout(request) == before_layout
            assert rm.stats() == before_stats
            assert rm.available_blocks() == available
            return
        assert needed <= available
        self.scheduled.add(request_id)
        request.num_computed_tokens = total_tokens
        if needed == 0:
            assert layout(request) == before_layout
            return
        # Where the blocks should have gone, by the rule in RManager's docstring.
        tail = before_layout[-1][0] if before_layout else None
        space = {owner: before_stats.free, **room}
        order = list(dict.fromkeys(
            [i for i in (tail, owner) if i is not None]
            + sorted((c for c in room if room[c] > 0), key=lambda c: (-room[c], c))))
        expected: dict[int, int] = {}
        left = needed
        for instance in order:
            n = min(space[instance], left)
            if n:
                expected[instance] = n
                left -= n
        grown = {i: blocks_on(request, i) - sum(nb for inst, _, nb, _ in before_layout
                                                if inst == i)
                 for i in range(len(self.rms))}
        assert {i: n for i, n in grown.items() if n} == expected
        assert sum(s.num_blocks for s in request.segments) == -(-total_tokens // bs)
        for creditor, n in expected.items():
            if creditor != owner:
                self.room[(owner, creditor)] -= n
                self.placed[(owner, creditor)] += n
        after = rm.stats()
        local = expected.get(owner, 0)
        assert (after.free, after.own, after.borrowed) == (
            before_stats.free - local, before_stats.own + local,
            before_stats.borrowed + needed - local)

    @precondition(lambda self: self.phase is Phase.SCHEDULE)
    @rule()
    def exchange(self) -> None:
        """Every creditor hosts the rows of the step's batch that owners placed on it."""
        for request_id in sorted(self.scheduled):
            owner, request = self.requests[request_id]
            for seg in request.segments:
                if seg.instance == owner:
                    continue
                hosted = self.rms[seg.instance].host(owner, request_id, seg.start,
                                                     seg.num_blocks)
                assert (hosted.instance, hosted.start, hosted.num_blocks, len(hosted.blocks)) \
                    == (seg.instance, seg.start, seg.num_blocks, seg.num_blocks)
        self.placed.clear()
        self.scheduled.clear()
        self.phase = Phase.FINISH
        for owner, creditor in self.pairs():
            assert self.set_aside(creditor, owner) == self.room[(owner, creditor)]

    # ---- finishes and the end of the step ---------------------------------------------------

    @precondition(lambda self: set(self.requests) - self.scheduled)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        """A request finishes (or is aborted with the plan, or preempted before its turn in the
        schedule): its owner frees it at once; creditors free on the next plan."""
        allowed = sorted(set(self.requests) - self.scheduled)
        self.finish(data.draw(st.sampled_from(allowed), label="request"))

    def finish(self, request_id: str) -> None:
        owner, request = self.requests.pop(request_id)
        before = self.rms[owner].stats()
        local = blocks_on(request, owner)
        remote = {c: blocks_on(request, c) for c in range(len(self.rms)) if c != owner}
        self.rms[owner].free(request)
        assert request.segments == []
        after = self.rms[owner].stats()
        assert (after.free, after.own, after.borrowed) == (
            before.free + local, before.own - local, before.borrowed - sum(remote.values()))
        for creditor, n in remote.items():
            if n:
                self.freed_blocks[(owner, creditor)] += n
                self.freed_ids[(owner, creditor)].append(request_id)

    @precondition(lambda self: self.phase is Phase.FINISH)
    @rule()
    def end_step(self) -> None:
        """Each owner ends its step; the next plan delivers each update to its creditor."""
        updates = {owner: rm.end_step() for owner, rm in enumerate(self.rms)}
        for owner, by_creditor in updates.items():
            expected = {}
            for creditor in range(len(self.rms)):
                pair = (owner, creditor)
                if self.freed_ids[pair] or self.room[pair]:
                    expected[creditor] = CreditorUpdate(
                        tuple(self.freed_ids[pair]), self.freed_blocks[pair], self.room[pair])
            assert by_creditor == expected
        for owner, by_creditor in updates.items():
            for creditor, update in by_creditor.items():
                self.rms[creditor].apply_update(owner, update)
                for request_id in update.freed:
                    assert (owner, request_id) not in self.rms[creditor]._hosted
        self.room.clear()
        self.freed_blocks.clear()
        self.freed_ids.clear()
        self.phase = Phase.PLAN
        for owner, creditor in self.pairs():
            assert self.borrowed(owner, creditor) == self.hosted(creditor, owner)
            assert self.set_aside(creditor, owner) == 0

    def teardown(self) -> None:
        """Every request finishes and the updates are delivered: every block is free again."""
        if not hasattr(self, "rms"):
            return
        if self.phase is Phase.SCHEDULE:
            self.exchange()
        for request_id in sorted(self.requests):
            self.finish(request_id)
        self.end_step()
        for rm in self.rms:
            total = rm.pool.num_blocks
            assert rm.stats() == KVStats(total=total, free=total, own=0, lent=0, borrowed=0)
            assert rm.available_blocks() == total
            assert rm.own_blocks_by_request() == ()
            assert rm.lenders() == ()

    # ---- invariants ------------------------------------------------------------------------

    @invariant()
    def blocks_add_up(self) -> None:
        for rm in self.rms:
            stats = rm.stats()
            assert stats.free + stats.own + stats.lent == stats.total
            owned = [b for o, r in self.requests.values() if o == rm.instance
                     for s in r.segments if s.instance == rm.instance for b in s.blocks]
            hosted = [b for segments in rm._hosted.values() for s in segments for b in s.blocks]
            aside = [b for blocks in rm._set_aside.values() for b in blocks]
            every = [*rm.pool._free, *owned, *hosted, *aside]  # the pool's own invariant
            assert sorted(every) == list(range(stats.total))
            assert stats.own == len(owned)
            assert stats.borrowed == sum(self.borrowed(rm.instance, c)
                                         for c in range(len(self.rms)) if c != rm.instance)

    @invariant()
    def requests_are_contiguous(self) -> None:
        for owner, request in self.requests.values():
            start = 0
            for seg in request.segments:
                assert seg.start == start and seg.num_blocks > 0
                assert len(seg.blocks) == (seg.num_blocks if seg.instance == owner else 0)
                start += seg.num_blocks * self.block_size

    @invariant()
    def borrowed_matches_hosted(self) -> None:
        for owner, creditor in self.pairs():
            pair = (owner, creditor)
            on_requests = sum(blocks_on(r, creditor) for o, r in self.requests.values()
                              if o == owner)
            assert self.borrowed(owner, creditor) == on_requests
            assert self.borrowed(owner, creditor) + self.freed_blocks[pair] \
                == self.hosted(creditor, owner) + self.placed[pair]
            assert self.set_aside(creditor, owner) == self.room[pair] + self.placed[pair]
        for rm in self.rms:
            assert rm.available_blocks() == rm.pool.num_free + sum(
                self.room[(rm.instance, c)] for c in range(len(self.rms)))


RManagerCluster.TestCase.settings = settings(max_examples=150, stateful_step_count=30,
                                             deadline=None)
TestRManagerCluster = RManagerCluster.TestCase


def test_new_blocks_grow_the_tail_then_here_then_creditors() -> None:
    """A request whose KV was migrated to instance 1 grows there first (one block of room),
    then here, and never on instance 2 although it offers the most room; instance 1 takes the
    block from the owner's set-aside when it hosts the grown segment."""
    home, tail, spare = (make_rmanager(i, 4, 2) for i in range(3))
    request = make_request("r", 4)
    assert home.reserve(request, 4)
    request.num_computed_tokens = 4
    assert [(s.instance, s.start, s.num_blocks) for s in request.segments] == [(0, 0, 2)]
    tail.adopt(0, "r", 0, 2)
    home.migrate_out(request, 1)
    for creditor, n in ((tail, 1), (spare, 3)):
        creditor.grant_lease(0, n)
        home.receive_lease(creditor.instance, n)

    assert home.reserve(request, 4)

    assert [(s.instance, s.start, s.num_blocks) for s in request.segments] == [(1, 0, 3),
                                                                              (0, 6, 1)]
    hosted = tail.host(0, "r", 0, 3)
    assert hosted.num_blocks == len(hosted.blocks) == 3
    assert home.stats() == KVStats(total=4, free=3, own=1, lent=0, borrowed=3)
    assert tail.stats() == KVStats(total=4, free=1, own=0, lent=3, borrowed=0)
    home.free(request)
    updates = home.end_step()
    assert updates == {1: CreditorUpdate(("r",), 3, 0), 2: CreditorUpdate((), 0, 3)}
    for creditor, update in updates.items():
        (tail, spare)[creditor - 1].apply_update(0, update)
    for rm in (home, tail, spare):
        assert rm.stats() == KVStats(total=4, free=4, own=0, lent=0, borrowed=0)


def test_blocks_freed_before_the_creditor_hosts_them_go_back() -> None:
    """A request freed after its owner placed blocks on a creditor but before any exchange told
    the creditor: the creditor finds them in the owner's set-aside, not hosted, and still frees
    every one of them."""
    def manager(instance: int, blocks: int) -> RManager:
        return RManager(KVPool(1, blocks, 1, 1, 1, torch.float32, torch.device("cpu")), instance)

    owner, creditor = manager(0, 1), manager(1, 2)
    creditor.grant_lease(0, 2)
    owner.receive_lease(1, 2)
    request = Request("r", [0, 0], SamplingParams(), 8, frozenset())
    assert owner.reserve(request, 2)  # one block here, one on the creditor
    owner.free(request)
    for creditor_id, update in owner.end_step().items():
        assert creditor_id == 1
        creditor.apply_update(0, update)
    assert creditor.stats() == KVStats(total=2, free=2, own=0, lent=0, borrowed=0)
    assert owner.stats() == KVStats(total=1, free=1, own=0, lent=0, borrowed=0)
