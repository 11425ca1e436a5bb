"""The cluster's processes: rank 0's `Driver` and the workers' loop, and the plan each instance
applies in a step.

Rank 0 starts ranks 1..N-1 (or joins torchrun's job), and each step broadcasts a `StepPlan`,
runs its own instance and gathers every instance's `StepReport`. A worker (`serve_worker`)
builds its instance and follows plans until told to stop. `run_plan` is the step of one
instance on any rank: the plan's changes, the instance's step, then its report. With one
instance there is no process group: the driver runs `run_plan` in-process.
"""

from __future__ import annotations

import logging
import os
import subprocess

import torch.distributed as dist

from infinite_llm.cluster.gmanager import Heartbeat
from infinite_llm.cluster.messages import CreditorNotice, StepPlan, StepReport
from infinite_llm.comm import Cluster, WorkerError, init_cluster, spawn_workers
from infinite_llm.config import ConfigError, EngineConfig
from infinite_llm.outputs import RequestDelta
from infinite_llm.worker.instance import Instance, build_instance

logger = logging.getLogger(__name__)


class WorkerExit(SystemExit):
    """Raised by `Driver.start` on a torchrun rank other than 0 once it has served as a worker
    until rank 0 shut down: the script's work on this rank is done (exit status 0)."""


def run_plan(instance: Instance, plan: StepPlan) -> StepReport:
    """One lockstep step of one instance: apply the plan (notices before leases, so released
    blocks can be leased again at once), step, then report to rank 0."""
    rmanager = instance.rmanager
    for notice in plan.notices:
        if notice.creditor == instance.rank:
            rmanager.apply_update(notice.owner, notice.update)
    for lease in plan.leases:
        if lease.creditor == instance.rank:
            rmanager.grant_lease(lease.debtor, lease.num_blocks)
        if lease.debtor == instance.rank:
            rmanager.receive_lease(lease.creditor, lease.num_blocks)
    deltas: list[RequestDelta] = [d for d in map(instance.abort, plan.aborts) if d is not None]
    if plan.migrations:
        instance.migrate(plan.migrations)
    for new in plan.requests:
        if new.owner == instance.rank:
            instance.add_request(new.request_id, list(new.prompt_token_ids), new.params,
                                 new.max_tokens)
    deltas.extend(instance.step(plan.can_borrow, plan.senior))
    notices = tuple(CreditorNotice(instance.rank, creditor, update)
                    for creditor, update in rmanager.end_step().items())
    return StepReport(tuple(deltas), heartbeat(instance), notices,
                      instance.scheduler.num_preemptions)


def heartbeat(instance: Instance) -> Heartbeat:
    """What the gManager sees of an instance after its step."""
    rmanager = instance.rmanager
    stats = rmanager.stats()
    load = instance.scheduler.load(rmanager.block_size)
    return Heartbeat(
        instance=instance.rank, total_blocks=stats.total, free_blocks=stats.free,
        own_blocks=stats.own, lent_blocks=stats.lent, borrowed_blocks=stats.borrowed,
        num_running=load.num_running, num_waiting=load.num_waiting,
        batch_tokens=instance.last_batch_tokens,
        request_blocks=rmanager.own_blocks_by_request(), prefill_tokens=load.prefill_tokens,
        waiting_tokens=load.waiting_tokens, head_tokens=load.head_tokens,
        lenders=rmanager.lenders(), num_stalled=load.num_stalled,
    )


def serve_worker(config: EngineConfig, rank: int, world_size: int) -> None:
    """A worker rank: join the cluster, build the instance, follow rank 0's plans until told to
    stop."""
    cluster = init_cluster(rank, world_size, config.load.torch_device,
                           config.cluster.worker_timeout_s, config.torch_data_backend)
    try:
        instance = build_instance(config, rank, cluster)
        cluster.gather(heartbeat(instance))
        while True:
            plan = cluster.broadcast(None)
            if plan.shutdown:
                break
            cluster.gather(run_plan(instance, plan))
    finally:
        dist.destroy_process_group()


class Driver:
    """Rank 0's end of the cluster: its own instance, the workers' processes and the step's
    collectives. A worker that dies or stays silent past `worker_timeout_s` turns every later
    call into the same `WorkerError`."""

    def __init__(self, config: EngineConfig, cluster: Cluster | None,
                 workers: list[subprocess.Popen]) -> None:
        self.cluster = cluster
        self.workers = workers
        self.failure: Exception | None = None
        self.instance = build_instance(config, 0, cluster)
        self.heartbeats: list[Heartbeat] = self._collect(heartbeat(self.instance))

    @classmethod
    def start(cls, config: EngineConfig) -> Driver:
        """Rank 0's driver: with several instances, start the workers (or join torchrun's job)
        and connect. On a torchrun rank other than 0 this process serves as a worker until
        rank 0 shuts down, then raises `WorkerExit`."""
        n = config.cluster.num_instances
        if n == 1:
            return cls(config, None, [])
        # Checked before anything starts: cleaning up would tear down the running engine's group.
        if dist.is_initialized():
            raise ConfigError("a multi-instance engine already runs in this process; "
                              "shutdown() it first")
        workers: list[subprocess.Popen] = []
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            if world != n:
                raise ConfigError(f"num_instances={n} but torchrun started {world} ranks")
            if rank != 0:
                serve_worker(config, rank, world)
                raise WorkerExit(0)
        else:
            workers = spawn_workers(n, config)
        try:
            cluster = init_cluster(0, n, config.load.torch_device,
                                   config.cluster.worker_timeout_s, config.torch_data_backend)
            return cls(config, cluster, workers)
        except BaseException:  # leave no worker or process group behind
            _kill(workers)
            if dist.is_initialized():
                dist.destroy_process_group()
            raise

    def step(self, plan: StepPlan) -> list[StepReport]:
        """Every instance's report on this plan's step (rank 0's own included)."""
        if self.cluster is None:
            return [run_plan(self.instance, plan)]
        try:
            self._broadcast(plan)
            return self._collect(run_plan(self.instance, plan))
        except BaseException as e:  # an error or Ctrl-C on rank 0 while the workers step
            if self.failure is None:
                self._abandon(e)
            raise

    def check(self) -> None:
        """Raise the cluster's failure, if any."""
        if self.failure is not None:
            raise self.failure

    def _broadcast(self, plan: StepPlan) -> None:
        self.check()
        if any(p.poll() is not None for p in self.workers):
            raise self._fail(RuntimeError("worker process exited"))
        try:
            self.cluster.broadcast(plan)
        except Exception as e:
            raise self._fail(e) from e

    def _collect(self, own: StepReport | Heartbeat) -> list:
        """Every instance's report (rank 0's given); a dead or silent worker raises."""
        if self.cluster is None:
            return [own]
        try:
            out = self.cluster.gather(own)
        except Exception as e:
            raise self._fail(e) from e
        assert out is not None
        return out

    def _fail(self, cause: Exception) -> WorkerError:
        dead = [i + 1 for i, p in enumerate(self.workers) if p.poll() is not None]
        self.failure = WorkerError(
            f"instance(s) {dead or '?'} stopped answering ({cause}); the engine is unusable")
        self._kill_workers()
        return self.failure

    def _abandon(self, cause: BaseException) -> None:
        """Rank 0 left a step half done: the workers wait in collectives it will never join,
        so the next step or shutdown would block for `worker_timeout_s` and then blame them."""
        self.failure = WorkerError(
            f"rank 0 stopped mid-step ({cause!r}); the instances are out of lockstep and the "
            "engine is unusable")
        self._kill_workers()

    def _kill_workers(self) -> None:
        _kill(self.workers)
        self.workers = []

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (safe to call twice)."""
        if self.cluster is None:
            return
        if self.failure is None:
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


def _kill(workers: list[subprocess.Popen]) -> None:
    """Kill the worker processes still running."""
    for p in workers:
        if p.poll() is None:
            p.kill()
