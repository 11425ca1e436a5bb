"""Typed control messages between instances (pickled over the gloo control group)."""

from __future__ import annotations

from dataclasses import dataclass

from infinite_llm.engine.output import RequestDelta
from infinite_llm.kvcache.rmanager import CreditorUpdate, KVStats
from infinite_llm.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class AssignedRequest:
    """A validated new request and the instance that will own it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    owner: int


@dataclass(frozen=True, slots=True)
class Lease:
    """The creditor sets `num_blocks` free blocks aside for the debtor's requests."""

    debtor: int
    creditor: int
    num_blocks: int


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Rank 0's decisions for one step, broadcast to every instance."""

    requests: tuple[AssignedRequest, ...] = ()
    aborts: tuple[str, ...] = ()
    leases: tuple[Lease, ...] = ()
    can_borrow: bool = False  # some instance has spare blocks: wait for a lease, don't preempt
    shutdown: bool = False


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One instance's state after a step, for the gManager."""

    instance: int
    kv: KVStats
    num_running: int
    num_waiting: int
    batch_tokens: int
    demand_blocks: int  # new blocks its queues want next step
    shortfall_blocks: int  # of those, what neither its free blocks nor its leases cover
    has_updates: bool  # frees or releases still to be sent to creditors
    num_preemptions: int  # since start


@dataclass(frozen=True, slots=True)
class StepReport:
    deltas: tuple[RequestDelta, ...]
    heartbeat: Heartbeat


@dataclass(frozen=True, slots=True)
class RemoteRow:
    """One request's work on a creditor this step: its queries, and new KV written there."""

    request_id: str
    q_start: int  # absolute position of the first query
    num_q: int
    seg_start: int  # first position of the request's segment on the creditor
    seg_blocks: int  # the segment's size after this step
    kv_lo: int  # new K/V for positions kv_lo .. kv_hi - 1 are stored on the creditor
    kv_hi: int


@dataclass(frozen=True, slots=True)
class ExchangeSummary:
    """What one instance sends to each creditor this step (by creditor rank)."""

    rows: dict[int, tuple[RemoteRow, ...]]
    updates: dict[int, CreditorUpdate]
