"""The gManager policy: a pure function of heartbeats, checked on hand-made and random clusters."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.cluster.gmanager import (
    GManager,
    GManagerConfig,
    Heartbeat,
    Lease,
    Migration,
    NewRequest,
    Placement,
    Plan,
)

BS = 16
CONFIG = GManagerConfig(block_size=BS, efficient_batch_tokens=64, reserve_blocks=2,
                        lookahead_tokens=16, max_migrations=2, min_migration_blocks=4)


def hb(instance: int, free: int, *, total: int = 64, running: int = 0, batch: int = 0,
       request_blocks: tuple[tuple[str, int], ...] = (), waiting: tuple[int, ...] = (),
       prefill: int = 0, lent: int = 0, lenders: tuple[int, ...] = (),
       stalled: int = 0) -> Heartbeat:
    """A consistent heartbeat: `waiting` lists the queued requests' prompt lengths."""
    return Heartbeat(
        instance=instance, total_blocks=total, free_blocks=free, own_blocks=total - free - lent,
        lent_blocks=lent, borrowed_blocks=0, num_running=running, num_waiting=len(waiting),
        batch_tokens=batch, request_blocks=request_blocks, prefill_tokens=prefill,
        waiting_tokens=sum(waiting), head_tokens=waiting[0] if waiting else 0, lenders=lenders,
        num_stalled=stalled)


def check_plan(gm: GManager, hbs: list[Heartbeat], new: list[NewRequest], plan: Plan) -> None:
    """Every invariant a plan must keep, whatever the heartbeats."""
    by = {h.instance: h for h in hbs}
    # every new request placed exactly once, on an instance that exists
    assert [p.request_id for p in plan.placements] == [r.request_id for r in new]
    assert all(p.instance in by for p in plan.placements)
    out: Counter[int] = Counter()  # blocks leaving each creditor (leases and migrations)
    into: Counter[int] = Counter()  # blocks going to each debtor
    for lease in plan.leases:
        assert lease.num_blocks > 0 and lease.debtor != lease.creditor
        out[lease.creditor] += lease.num_blocks
        into[lease.debtor] += lease.num_blocks
    for m in plan.migrations:
        assert m.source != m.target
        assert m.num_blocks == dict(by[m.source].request_blocks)[m.request_id]
        out[m.target] += m.num_blocks
        into[m.source] += m.num_blocks
    assert sum(out.values()) == sum(into.values())
    pairs = [(lease.debtor, lease.creditor) for lease in plan.leases]
    assert len(pairs) == len(set(pairs)), "a (debtor, creditor) pair leased twice"
    assert not set(out) & set(into), "an instance is both debtor and creditor"
    for creditor, n in out.items():
        assert n <= by[creditor].free_blocks - gm.config.reserve_blocks, "lent more than free"
    placed: dict[int, list[int]] = {}
    prompt = {r.request_id: r.num_prompt_tokens for r in new}
    for p in plan.placements:
        placed.setdefault(p.instance, []).append(prompt[p.request_id])
    migrated = Counter({m.source: m.num_blocks for m in plan.migrations})
    for debtor in {lease.debtor for lease in plan.leases}:
        h = by[debtor]
        debt = min(gm.demand_blocks(h, placed.get(debtor, ())) - h.free_blocks,
                   gm.config.max_lease_blocks)
        leased = into[debtor] - migrated[debtor]
        assert leased <= debt - min(migrated[debtor], debt), "lent a debtor more than its debt"
    assert len(plan.migrations) <= gm.config.max_migrations


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Heartbeat], list[NewRequest]]:
    """Up to 12 instances in any state a real cluster could report, and a few new requests."""
    hbs = []
    for i in range(draw(st.integers(1, 12))):
        total = draw(st.integers(8, 256))
        lent = draw(st.integers(0, total))
        free = draw(st.integers(0, total - lent))
        running = draw(st.integers(0, 16))
        sizes = draw(st.lists(st.integers(1, 64), max_size=min(running, 4)))
        hbs.append(hb(i, free, total=total, lent=lent, running=running,
                      batch=draw(st.integers(0, 256)),
                      request_blocks=tuple((f"r{i}-{k}", n) for k, n in enumerate(sizes)),
                      waiting=tuple(draw(st.lists(st.integers(1, 4096), max_size=5))),
                      prefill=draw(st.integers(0, 2048))))
    prompts = draw(st.lists(st.integers(1, 8192), max_size=6))
    return hbs, [NewRequest(f"new-{k}", p, 32) for k, p in enumerate(prompts)]


@settings(max_examples=150, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_random_clusters_keep_every_invariant(cluster, rnd: random.Random) -> None:
    hbs, new = cluster
    gm = GManager(CONFIG)
    plan = gm.plan(hbs, new)
    check_plan(gm, hbs, new, plan)
    shuffled = list(hbs)
    rnd.shuffle(shuffled)
    assert gm.plan(shuffled, new) == plan, "heartbeat order changed the plan"
    assert GManager(CONFIG).plan(hbs, new) == plan, "same input, different plan"
    senior = rnd.randrange(len(hbs))
    for policy in (gm, GManager(dataclasses.replace(CONFIG, lend_to_running=False))):
        plan = policy.plan(hbs, new, senior)
        check_plan(policy, hbs, new, plan)
        assert policy.plan(shuffled, new, senior) == plan, "heartbeat order changed the plan"


def test_senior_instance_is_lent_to_before_younger_queues() -> None:
    """Both instances run one request that has outgrown its memory and stalled, and hold a
    younger one in the queue: neither has credit, so without seniority nobody lends. The
    instance owning the oldest request is lent the other's free blocks (what its running
    request needs, its queue aside); the lender is no debtor in this plan."""
    hbs = [hb(0, 3, running=1, batch=8, prefill=160, waiting=(300,), stalled=1),
           hb(1, 8, running=1, batch=8, prefill=160, waiting=(400,), stalled=1)]
    gm = GManager(CONFIG)
    assert gm.plan(hbs, []).leases == ()
    plan = gm.plan(hbs, [], senior=0)
    check_plan(gm, hbs, [], plan)
    assert plan.leases == (Lease(debtor=0, creditor=1, num_blocks=6),)  # all but the reserve
    # instance 1's running request needs 11 blocks, 3 more than it has; 0 can spare 1
    assert gm.plan(hbs, [], senior=1).leases == (Lease(debtor=1, creditor=0, num_blocks=1),)
    calm = [hb(0, 3, running=1, batch=8, prefill=160, waiting=(300,)), hbs[1]]
    assert gm.plan(calm, [], senior=0).leases == (), "not stuck: no priority"


def test_without_lending_to_running_only_idle_debtors_and_the_senior_borrow() -> None:
    """Instances with requests running get only what they were promised (the rest of a
    prompt admitted on a lease), not leases for their queues."""
    hbs = [hb(0, 0, running=4, batch=4, waiting=(192,)),  # debt 16, running
           hb(1, 0, waiting=(200,)),  # debt 13, nothing running
           hb(2, 0, running=1, batch=8, prefill=64, stalled=1),  # stuck: debt 5
           hb(3, 40, batch=8),  # spare 38
           hb(4, 0, running=1, batch=16, prefill=48, waiting=(64,))]  # admitted: owed 3
    gm = GManager(GManagerConfig(block_size=BS, efficient_batch_tokens=64, reserve_blocks=2,
                                 lend_to_running=False))
    plan = gm.plan(hbs, [], senior=2)
    check_plan(gm, hbs, [], plan)
    assert plan.leases == (Lease(2, 3, 5), Lease(1, 3, 13), Lease(4, 3, 3))


def test_debtor_borrows_from_its_lenders_first() -> None:
    """A debtor already borrowing from instance 2 grows there before taking the larger credit,
    so a long request keeps one segment per creditor."""
    hbs = [hb(0, 0, running=4, batch=4, waiting=(192,), lenders=(2,)),  # debt 16
           hb(1, 32, batch=8),  # spare 30
           hb(2, 12, batch=8)]  # spare 10
    plan = GManager(CONFIG).plan(hbs, [])
    assert plan.leases == (Lease(0, 2, 10), Lease(0, 1, 6))


def test_largest_debt_paired_with_largest_credit() -> None:
    hbs = [
        hb(0, 4, running=4, batch=4, waiting=(256,)),  # demand 4 + 16 = 20 -> debt 16
        hb(1, 30, batch=8),  # spare 30 - 0 - 2 = 28
        hb(2, 0, running=8, batch=8, waiting=(64,)),  # demand 8 + 4 = 12 -> debt 12
        hb(3, 12, batch=8),  # spare 10
    ]
    plan = GManager(CONFIG).plan(hbs, [])
    assert plan.leases[0] == Lease(debtor=0, creditor=1, num_blocks=16)
    assert plan.leases[1] == Lease(debtor=2, creditor=1, num_blocks=12)
    assert sum(lease.num_blocks for lease in plan.leases) == 28
    check_plan(GManager(CONFIG), hbs, [], plan)


def test_busy_instance_does_not_lend() -> None:
    """Spare memory but a batch at the efficient size: no attention time to lend."""
    hbs = [hb(0, 0, running=2, batch=2, waiting=(160,)), hb(1, 60, batch=64)]
    assert GManager(CONFIG).plan(hbs, []).leases == ()


def test_debt_larger_than_all_credit_gets_the_rest_after_smaller_debts() -> None:
    hbs = [
        hb(0, 0, running=1, batch=1, waiting=(1600,)),  # debt 101: more than all credit
        hb(1, 0, running=4, batch=4, waiting=(32,)),  # debt 6
        hb(2, 22, batch=1),  # spare 20
    ]
    plan = GManager(CONFIG).plan(hbs, [])
    assert plan.leases == (Lease(1, 2, 6), Lease(0, 2, 14))


def test_stranded_instances_lend_to_the_one_closest_to_running() -> None:
    """Every instance idle, every queue head a little larger than one instance: without the
    stranded rule nobody lends and nothing ever runs."""
    heads = [1100, 1030, 1500, 1200]  # 69, 65, 94, 75 blocks against 64 free
    hbs = [hb(i, 64, waiting=(h,)) for i, h in enumerate(heads)]
    gm = GManager(CONFIG)
    plan = gm.plan(hbs, [])
    check_plan(gm, hbs, [], plan)
    assert plan.leases[0] == Lease(debtor=1, creditor=2, num_blocks=1)
    assert {lease.debtor for lease in plan.leases} == {1, 0, 3}
    assert {lease.creditor for lease in plan.leases} == {2}


def test_migration_moves_a_blocked_debtors_largest_request() -> None:
    hbs = [
        hb(0, 1, running=2, batch=2, request_blocks=(("big", 40), ("small", 3)),
           waiting=(200,)),
        hb(1, 60, batch=4),
    ]
    gm = GManager(CONFIG)
    plan = gm.plan(hbs, [])
    assert plan.migrations == (Migration("big", source=0, target=1, num_blocks=40),)
    check_plan(gm, hbs, [], plan)


def test_no_migration_without_a_waiting_queue() -> None:
    hbs = [hb(0, 0, running=2, batch=2, request_blocks=(("big", 40),)), hb(1, 60, batch=4)]
    plan = GManager(CONFIG).plan(hbs, [])
    assert plan.migrations == () and plan.leases == (Lease(0, 1, 2),)


def test_placement_prefers_free_memory_and_spreads_load() -> None:
    gm = GManager(CONFIG)
    hbs = [hb(0, 10), hb(1, 40), hb(2, 20)]
    assert gm.plan(hbs, [NewRequest("a", 100, 8)]).placements == (Placement("a", 1),)
    # equal memory: four requests go to four instances, lowest index first
    hbs = [hb(i, 32) for i in range(4)]
    new = [NewRequest(f"r{k}", 64, 8) for k in range(4)]
    assert [p.instance for p in gm.plan(hbs, new).placements] == [0, 1, 2, 3]
    # equal net free memory (40 free - 3 lookahead blocks == 37): fewer requests wins
    hbs = [hb(0, 40, running=3, batch=3), hb(1, 37)]
    assert gm.plan(hbs, [NewRequest("x", 16, 8)]).placements == (Placement("x", 1),)


def test_placement_counts_the_whole_queue() -> None:
    """An instance with more free blocks but a long queue is fuller than it looks."""
    hbs = [hb(0, 60, waiting=(512, 512)), hb(1, 30)]
    assert GManager(CONFIG).plan(hbs, [NewRequest("a", 16, 8)]).placements[0].instance == 1


def test_request_larger_than_any_instance_is_placed() -> None:
    hbs = [hb(0, 64), hb(1, 64)]
    plan = GManager(CONFIG).plan(hbs, [NewRequest("huge", 100_000, 8)])
    assert plan.placements == (Placement("huge", 0),)


def test_static_mode_places_only() -> None:
    gm = GManager(GManagerConfig(block_size=BS, efficient_batch_tokens=64, pooling=False))
    hbs = [hb(0, 0, running=8, batch=8, request_blocks=(("a", 30),), waiting=(500,)),
           hb(1, 64)]
    plan = gm.plan(hbs, [NewRequest("n", 10, 8)])
    assert plan.leases == () and plan.migrations == () and len(plan.placements) == 1


def test_bad_input_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        GManagerConfig(block_size=0, efficient_batch_tokens=64)
    with pytest.raises(ValueError):
        GManagerConfig(block_size=16, efficient_batch_tokens=64, reserve_blocks=-1)
    gm = GManager(CONFIG)
    with pytest.raises(ValueError):
        gm.plan([hb(0, 1), hb(0, 2)], [])
    with pytest.raises(ValueError):
        gm.plan([], [NewRequest("a", 1, 1)])
    assert gm.plan([], []) == Plan()
