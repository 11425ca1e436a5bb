"""LLMEngine: add_request / step / abort over the cluster's instances.

The engine is the frontend on rank 0: it validates requests (as token ids: its callers tokenize,
once), asks the gManager where each goes and who lends to whom (from the instances' heartbeats),
hands the step's `StepPlan` to the `Driver` (which runs it on every instance) and folds the
reported `RequestDelta`s into cumulative `RequestOutput`s. The processes themselves are the
driver's business.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
from collections.abc import Sequence

from infinite_llm.cluster.driver import Driver
from infinite_llm.cluster.gmanager import (
    GManager,
    GManagerConfig,
    Heartbeat,
    Lease,
    Migration,
    NewRequest,
)
from infinite_llm.cluster.messages import AssignedRequest, CreditorNotice, StepPlan
from infinite_llm.comm import Cluster
from infinite_llm.config import EngineConfig
from infinite_llm.kvcache.rmanager import KVStats
from infinite_llm.outputs import RequestDelta, RequestOutput
from infinite_llm.request import FinishReason
from infinite_llm.sampling import SamplingParams

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request cannot be served as asked (empty, too long, duplicate id, no tokenizer...)."""


class MigrationError(RequestError):
    """A migration asked of `LLMEngine.migrate` can't be done (no such target, or no room)."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.driver = Driver.start(config)
        if self.driver.cluster is not None:
            atexit.register(self.shutdown)
        self.instance = self.driver.instance
        self.heartbeats: list[Heartbeat] = self.driver.heartbeats
        self.model_config = self.instance.model.config
        self.tokenizer = self.instance.tokenizer
        pooled = config.cluster.kv_mode == "pooled"
        capacity = [h.total_blocks * config.cache.block_size for h in self.heartbeats]
        self.max_model_len = self._max_model_len(sum(capacity) if pooled else min(capacity))
        self.gmanager = GManager(GManagerConfig(
            block_size=config.cache.block_size,
            efficient_batch_tokens=config.scheduler.max_num_batched_tokens,
            pooling=pooled, lend_to_running=config.load.torch_device.type != "cpu"))
        self.outputs: dict[str, RequestOutput] = {}
        self._pending: list[AssignedRequest] = []  # placed by the next plan
        self._aborts: list[str] = []
        self._notices: list[CreditorNotice] = []
        self._preemptions = [0] * len(self.heartbeats)
        self._owners: dict[str, int] = {}
        self._migrations: list[Migration] = []
        self._ids = itertools.count()

    @property
    def cluster(self) -> Cluster | None:
        return self.driver.cluster

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (safe to call twice)."""
        self.driver.shutdown()

    def _max_model_len(self, capacity_tokens: int) -> int:
        """The longest sequence served: the model's limit, capped by what the KV can hold."""
        mc = self.model_config
        limits = [mc.max_position_embeddings, capacity_tokens]
        if mc.sliding_window:  # attention here is full; past the window it would differ
            limits.append(mc.sliding_window)
        if self.config.load.max_model_len is not None:
            limits.append(self.config.load.max_model_len)
        return min(limits)

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt: str | None = None,
    ) -> str:
        """Queue a request for its prompt's token ids (`prompt`, the text they were made from,
        only becomes its output's `prompt`). Raises RequestError when it can never be served,
        and the engine's WorkerError once an instance has failed. Returns its id."""
        self.driver.check()
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.outputs:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = [int(t) for t in prompt_token_ids]
        if any(t < 0 or t >= self.model_config.vocab_size for t in ids):
            raise RequestError(f"token ids must be in [0, {self.model_config.vocab_size})")
        if not ids:
            raise RequestError("the prompt is empty")
        room = self.max_model_len - len(ids)
        if room < 1:
            where = "one instance" if self.config.cluster.kv_mode == "static" else "this engine"
            raise RequestError(
                f"the prompt has {len(ids)} tokens; {where} serves at most "
                f"{self.max_model_len} tokens per request (prompt + output), so at most "
                f"{self.max_model_len - 1} prompt tokens"
            )
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.outputs[request_id] = RequestOutput.empty(request_id, prompt, ids,
                                                       params.logprobs is not None)
        self._pending.append(AssignedRequest(request_id, tuple(ids), params, max_tokens))
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks (on every instance by the end of the next step);
        unknown or finished ids are ignored."""
        pending = [a for a in self._pending if a.request_id == request_id]
        if pending:
            self._pending.remove(pending[0])
            self._apply(RequestDelta(request_id, (), "", (), FinishReason.ABORT))
        elif request_id in self.outputs:
            if self.cluster is None:
                delta = self.instance.abort(request_id)
                if delta is not None:
                    self._apply(delta)
            else:
                self._aborts.append(request_id)

    def step(self) -> list[RequestOutput]:
        """One lockstep step of every instance; returns the outputs that changed (vLLM's
        shape: `LLM.generate` reads these)."""
        return [self._apply(delta) for delta in self._step()]

    def step_deltas(self) -> list[RequestDelta]:
        """One step, as `step`, returning what it added to each request, not folded into
        `outputs`: the caller accumulates them once, where it needs them (a server, on its
        event loop, per stream); the deltas are immutable, so they may cross threads."""
        deltas = self._step()
        for delta in deltas:
            if delta.finish_reason is not None:
                self._forget(delta.request_id)
        return deltas

    def _step(self) -> list[RequestDelta]:
        plan = self._plan()
        self._pending, self._aborts, self._notices = [], [], []
        reports = self.driver.step(plan)
        self.heartbeats = [r.heartbeat for r in reports]
        self._notices = [n for r in reports for n in r.notices]
        self._preemptions = [r.num_preemptions for r in reports]
        return [d for r in reports for d in r.deltas]

    def _plan(self) -> StepPlan:
        """Ask the gManager where new requests go and who lends to whom, seeing creditors as
        they will be once this plan's notices have freed blocks."""
        freed: dict[int, int] = {}
        for notice in self._notices:
            freed[notice.creditor] = freed.get(notice.creditor, 0) + notice.update.num_blocks
        for m in self._migrations:  # asked for by hand: their room is taken already
            freed[m.target] = freed.get(m.target, 0) - m.num_blocks
        heartbeats = [dataclasses.replace(h, free_blocks=h.free_blocks + freed.get(h.instance, 0),
                                          lent_blocks=h.lent_blocks - freed.get(h.instance, 0))
                      for h in self.heartbeats]
        new = [NewRequest(a.request_id, len(a.prompt_token_ids), a.max_tokens)
               for a in self._pending]
        senior = next((rid for rid in self.outputs if rid in self._owners), None)
        decision = self.gmanager.plan(heartbeats, new, self._owners.get(senior))
        self._owners.update((p.request_id, p.instance) for p in decision.placements)
        requests = tuple(dataclasses.replace(a, owner=self._owners[a.request_id])
                         for a in self._pending)
        # A request moved by hand this step is not moved by the gManager too: the owner would
        # have nothing left to send for the second move.
        by_hand = {m.request_id for m in self._migrations}
        migrations = (tuple(m for m in decision.migrations if m.request_id not in by_hand)
                      + tuple(self._migrations))
        self._migrations = []
        return StepPlan(requests, tuple(self._aborts), tuple(self._notices), decision.leases,
                        migrations, self._has_spare(heartbeats, decision.leases), senior)

    def migrate(self, request_id: str, target: int) -> None:
        """Move the request's KV blocks on its owner to `target` at the next step (the
        gManager does this on its own when an owner is short of memory). Raises
        MigrationError when the target's free blocks, less those promised to migrations already
        asked for, can't hold the request's blocks on its owner, when it holds none there
        (waiting, or moved already: the owner would have nothing to send) or when a migration
        of it is asked for already."""
        owner = self._owners.get(request_id)
        if owner is None or request_id not in self.outputs:
            raise RequestError(f"request {request_id!r} is not running")
        if not 0 <= target < len(self.heartbeats) or target == owner:
            raise MigrationError(f"cannot migrate to instance {target}")
        if any(m.request_id == request_id for m in self._migrations):
            raise MigrationError(f"request {request_id!r} migrates at the next step already")
        held = dict(self.heartbeats[owner].request_blocks).get(request_id, 0)
        if held == 0:
            raise MigrationError(f"request {request_id!r} holds no blocks on its owner, "
                                 f"instance {owner}")
        room = self.heartbeats[target].free_blocks - sum(
            m.num_blocks for m in self._migrations if m.target == target)
        if held > room:
            raise MigrationError(f"request {request_id!r} holds {held} blocks on instance "
                                 f"{owner}; instance {target} has room for {room}")
        self._migrations.append(Migration(request_id, owner, target, held))

    def _apply(self, delta: RequestDelta) -> RequestOutput:
        """Fold the delta into its request's output; a finished request leaves the engine."""
        output = self.outputs[delta.request_id]
        output.apply(delta)
        if output.finished:
            self._forget(delta.request_id)
        return output

    def _forget(self, request_id: str) -> None:
        """A finished request leaves the engine."""
        del self.outputs[request_id]
        self._owners.pop(request_id, None)

    def _has_spare(self, heartbeats: list[Heartbeat], leases: tuple[Lease, ...]) -> bool:
        """Whether some instance still has free blocks after these leases (so a debtor that
        runs short should wait for the next lease rather than preempt)."""
        policy = self.gmanager.config
        if self.cluster is None or not (policy.pooling and policy.lend_to_running):
            return False  # static, or only idle instances and the senior are lent to
        lent = {h.instance: 0 for h in heartbeats}
        for lease in leases:
            lent[lease.creditor] += lease.num_blocks
        return any(h.free_blocks - lent[h.instance] > 0 for h in heartbeats)

    def has_unfinished_requests(self) -> bool:
        """True while requests run or wait, or creditors still have blocks to be told to free."""
        if self._pending or self._aborts or self._notices:
            return True
        if self.cluster is None:
            return self.instance.num_unfinished > 0
        return any(h.num_running or h.num_waiting for h in self.heartbeats)

    def kv_stats(self) -> list[KVStats]:
        """Per instance, as of the last step (live for a single instance); the engine's
        WorkerError once an instance has failed, since the last step's counts are stale."""
        self.driver.check()
        if self.cluster is None:
            return [self.instance.rmanager.stats()]
        return [KVStats(h.total_blocks, h.free_blocks, h.own_blocks, h.lent_blocks,
                        h.borrowed_blocks) for h in self.heartbeats]

    @property
    def num_preemptions(self) -> int:
        """Preemptions on every instance, as of the last step."""
        return sum(self._preemptions)

