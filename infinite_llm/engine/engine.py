"""LLMEngine: add_request / step / abort over the cluster's instances.

The engine is the frontend on rank 0: it validates and tokenizes requests, places each on an
owner instance, decides leases from the instances' heartbeats, broadcasts the step's plan, runs
rank 0's own instance and gathers every instance's report, folding deltas into cumulative
`RequestOutput`s. With one instance no process group exists and the same path runs in-process.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from infinite_llm.comm import Cluster, WorkerError, init_cluster, spawn_workers
from infinite_llm.cluster.gmanager import (
    GManager,
    GManagerConfig,
    Heartbeat,
    Lease,
    Migration,
    NewRequest,
)
from infinite_llm.worker.instance import build_instance
from infinite_llm.cluster.messages import AssignedRequest, CreditorNotice, StepPlan, StepReport
from infinite_llm.cluster.driver import serve_worker
from infinite_llm.config import ConfigError, EngineConfig
from infinite_llm.outputs import CompletionOutput, RequestDelta, RequestOutput
from infinite_llm.kvcache.rmanager import KVStats
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
        self.workers: list[subprocess.Popen] = []
        self._failure: Exception | None = None
        # Checked before the try: its cleanup would tear down the running engine's group.
        if config.num_instances > 1 and dist.is_initialized():
            raise ConfigError("a multi-instance engine already runs in this process; "
                              "shutdown() it first")
        try:
            self.cluster = self._start_cluster(config)
            self.instance = build_instance(config, 0, self.cluster)
            self.heartbeats: list[Heartbeat] = self._collect([self.instance.heartbeat()])
        except BaseException:  # leave no worker or process group behind
            self._kill_workers()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        self.model_config = self.instance.model.config
        self.tokenizer = self.instance.tokenizer
        pooled = config.kv_mode == "pooled"
        capacity = [h.total_blocks * config.block_size for h in self.heartbeats]
        self.max_model_len = self._max_model_len(sum(capacity) if pooled else min(capacity))
        self.gmanager = GManager(GManagerConfig(
            block_size=config.block_size, efficient_batch_tokens=config.max_num_batched_tokens,
            pooling=pooled, lend_to_running=config.torch_device.type != "cpu"))
        self.outputs: dict[str, RequestOutput] = {}
        self._pending: list[AssignedRequest] = []  # placed by the next plan
        self._aborts: list[str] = []
        self._notices: list[CreditorNotice] = []
        self._preemptions = [0] * len(self.heartbeats)
        self._owners: dict[str, int] = {}
        self._migrations: list[Migration] = []
        self._ids = itertools.count()
        if self.cluster is not None:
            atexit.register(self.shutdown)

    # ---- cluster ----------------------------------------------------------------------------

    def _start_cluster(self, config: EngineConfig) -> Cluster | None:
        """None for one instance; else spawn the workers (or join torchrun's job) and connect."""
        n = config.num_instances
        if n == 1:
            return None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            if world != n:
                raise ConfigError(f"num_instances={n} but torchrun started {world} ranks")
            if rank != 0:  # this process is a worker: serve rank 0's plans, then leave
                serve_worker(config, rank, world)
                sys.exit(0)
        else:
            self.workers = spawn_workers(n, config)
        return init_cluster(0, n, config.torch_device, config.worker_timeout_s,
                            config.torch_data_backend)

    def _broadcast(self, plan: StepPlan) -> None:
        """Send the step's plan to the workers; a dead one raises WorkerError."""
        if self.cluster is None:
            return
        self._check_workers()
        try:
            self.cluster.broadcast(plan)
        except Exception as e:
            raise self._fail(e) from e

    def _collect(self, report: Any) -> list[Any]:
        """Every instance's report (rank 0's given); a dead or silent worker raises WorkerError."""
        if self.cluster is None:
            return report
        try:
            out = self.cluster.gather(report[0])
        except Exception as e:
            raise self._fail(e) from e
        assert out is not None
        return out

    def _fail(self, cause: Exception) -> WorkerError:
        dead = [i + 1 for i, p in enumerate(self.workers) if p.poll() is not None]
        self._failure = WorkerError(
            f"instance(s) {dead or '?'} stopped answering ({cause}); the engine is unusable")
        self._kill_workers()
        return self._failure

    def _abandon(self, cause: BaseException) -> None:
        """Rank 0 left a step half done: the workers wait in collectives it will never join,
        so the next step or shutdown would block for `worker_timeout_s` and then blame them."""
        self._failure = WorkerError(
            f"rank 0 stopped mid-step ({cause!r}); the instances are out of lockstep and the "
            "engine is unusable")
        self._kill_workers()

    def _check_workers(self) -> None:
        if self._failure is not None:
            raise self._failure
        if any(p.poll() is not None for p in self.workers):
            raise self._fail(RuntimeError("worker process exited"))

    def _kill_workers(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.kill()
        self.workers = []

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (safe to call twice)."""
        if self.cluster is None:
            return
        if self._failure is None:
            try:
                self.cluster.broadcast(StepPlan(shutdown=True))
                # NCCL's teardown waits for every rank's: leave the group before waiting for
                # the workers, which leave theirs after the broadcast (else each waits 30 s).
                dist.destroy_process_group()
                for p in self.workers:
                    p.wait(timeout=30)
            except Exception as e:  # already failing: make sure nothing is left running
                logger.warning("shutdown: %s", e)
        self._kill_workers()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.cluster = None

    def _max_model_len(self, capacity_tokens: int) -> int:
        """The longest sequence served: the model's limit, capped by what the KV can hold."""
        mc = self.model_config
        limits = [mc.max_position_embeddings, capacity_tokens]
        if mc.sliding_window:  # attention here is full; past the window it would differ
            limits.append(mc.sliding_window)
        if self.config.max_model_len is not None:
            limits.append(self.config.max_model_len)
        return min(limits)

    # ---- requests -------------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model folder has no tokenizer: pass token ids")
            check_unicode(prompt)
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if any(t < 0 or t >= self.model_config.vocab_size for t in ids):
            raise RequestError(f"token ids must be in [0, {self.model_config.vocab_size})")
        return ids

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; raises RequestError when it can never be served, and the engine's
        WorkerError once an instance has failed. Returns its id."""
        if self._failure is not None:
            raise self._failure
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.outputs:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        room = self.max_model_len - len(ids)
        if room < 1:
            where = "one instance" if self.config.kv_mode == "static" else "this engine"
            raise RequestError(
                f"the prompt has {len(ids)} tokens; {where} serves at most "
                f"{self.max_model_len} tokens per request (prompt + output), so at most "
                f"{self.max_model_len - 1} prompt tokens"
            )
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.outputs[request_id] = RequestOutput(
            request_id, prompt if isinstance(prompt, str) else None, ids,
            [CompletionOutput(0, "", [], None, [] if params.logprobs is not None else None)],
        )
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
        """One lockstep step of every instance; returns the outputs that changed."""
        plan = self._plan()
        self._pending, self._aborts, self._notices = [], [], []
        try:
            self._broadcast(plan)
            reports: list[StepReport] = self._collect([self.instance.run(plan)])
        except BaseException as e:  # an error or Ctrl-C on rank 0 while the workers step
            if self.cluster is not None and self._failure is None:
                self._abandon(e)
            raise
        self.heartbeats = [r.heartbeat for r in reports]
        self._notices = [n for r in reports for n in r.notices]
        self._preemptions = [r.num_preemptions for r in reports]
        return [self._apply(d) for r in reports for d in r.deltas]

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
        output = self.outputs[delta.request_id]
        output.apply(delta)
        if output.finished:
            del self.outputs[delta.request_id]
            self._owners.pop(delta.request_id, None)
        return output

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
        if self._failure is not None:
            raise self._failure
        if self.cluster is None:
            return [self.instance.rmanager.stats()]
        return [KVStats(h.total_blocks, h.free_blocks, h.own_blocks, h.lent_blocks,
                        h.borrowed_blocks) for h in self.heartbeats]

    @property
    def num_preemptions(self) -> int:
        """Preemptions on every instance, as of the last step."""
        return sum(self._preemptions)


def check_unicode(text: str) -> None:
    """RequestError for a str that no tokenizer takes: a lone surrogate (JSON's escape
    \\ud800 decodes to one), on which the tokenizer raises a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"the prompt is not valid Unicode text ({e.reason} at character "
                           f"{e.start})") from e


def engine_config(model: str | None, options: dict[str, Any]) -> EngineConfig:
    """EngineConfig from keyword options, with a clear error for an unknown one."""
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown engine options {unknown}; known: {sorted(known - {'model'})}")
    return EngineConfig(model=model, **options)
