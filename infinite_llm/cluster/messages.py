"""Typed control messages between rank 0 and the instances (pickled over the gloo control
group): the step's plan going out, each instance's report coming back. The per-layer exchange
of a step carries tensors, laid out by `attention.layout`."""

from __future__ import annotations

from dataclasses import dataclass

from infinite_llm.cluster.gmanager import Heartbeat, Lease, Migration
from infinite_llm.kvcache.rmanager import CreditorUpdate
from infinite_llm.outputs import RequestDelta
from infinite_llm.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class AssignedRequest:
    """A validated new request and the instance that will own it (None until placed)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    owner: int | None = None


@dataclass(frozen=True, slots=True)
class CreditorNotice:
    """An owner's frees and releases for one creditor, forwarded by rank 0 in the next plan."""

    owner: int
    creditor: int
    update: CreditorUpdate


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Rank 0's decisions for one step, broadcast to every instance and applied in field order
    (notices before leases, so released blocks can be leased again at once)."""

    requests: tuple[AssignedRequest, ...] = ()
    aborts: tuple[str, ...] = ()
    notices: tuple[CreditorNotice, ...] = ()
    leases: tuple[Lease, ...] = ()
    migrations: tuple[Migration, ...] = ()
    can_borrow: bool = False  # some instance has spare blocks: wait for a lease, don't preempt
    senior: str | None = None  # the cluster's oldest unfinished request: never preempted
    shutdown: bool = False


@dataclass(frozen=True, slots=True)
class StepReport:
    deltas: tuple[RequestDelta, ...]
    heartbeat: Heartbeat
    notices: tuple[CreditorNotice, ...]  # for rank 0 to forward in the next plan
    num_preemptions: int  # since start
