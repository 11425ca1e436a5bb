"""One instance: the model, its KV pool and rManager, its scheduler, and the step that runs them.

A step reads aloud: apply the plan -> schedule -> lay out the exchange -> forward -> sample ->
report. The instance owns its requests from admission to finish; what changed leaves as
`RequestDelta`s in its `StepReport`, with a heartbeat for the gManager. On a GPU, alone in its
cluster, a step may find its forward already queued by the step before (async scheduling,
`DecodeGraphs.launch_ahead`): it then schedules, checks that the batch is the one queued, and
samples.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from torch import Tensor

from infinite_llm.attention.dist import DistAttention, to_device
from infinite_llm.comm import Cluster, rank_device
from infinite_llm.cluster.gmanager import Heartbeat
from infinite_llm.cluster.messages import CreditorNotice, StepPlan, StepReport
from infinite_llm.worker.migration import migrate
from infinite_llm.config import ConfigError, EngineConfig
from infinite_llm.worker.cuda_graphs import Ahead, DecodeGraphs
from infinite_llm.outputs import Detokenizer, RequestDelta
from infinite_llm.worker.scheduler import ScheduledBatch, Scheduler
from infinite_llm.worker.threads import StepThreads
from infinite_llm.kvcache.pool import KVPool
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.models.llama import LlamaForCausalLM
from infinite_llm.models.loader import load_model, load_tokenizer, resolve_model
from infinite_llm.request import FinishReason, Request
from infinite_llm.sampling import Sampler, make_generator

logger = logging.getLogger(__name__)


class Instance:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, tokenizer: Any,
                 config: EngineConfig, eos_token_ids: frozenset[int], rank: int = 0,
                 cluster: Cluster | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.rank = rank
        self.cluster = cluster
        self.eos_token_ids = eos_token_ids
        self.rmanager = RManager(pool, rank)
        self.scheduler = Scheduler(self.rmanager, config.max_num_batched_tokens,
                                   config.max_num_seqs)
        mc = model.config
        self.attention = DistAttention(pool, self.rmanager, cluster, mc.num_heads,
                                       mc.num_kv_heads, mc.head_dim)
        self.device = pool.k.device
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(model, self.attention, config.max_num_seqs)
            start = time.perf_counter()
            self.graphs.capture_all(pool.num_blocks * pool.block_size)
            logger.info("rank %d: captured %d decode graphs in %.1f s", rank,
                        len(self.graphs.graphs), time.perf_counter() - start)
        self.async_scheduling = config.async_scheduling and cluster is None
        if self.graphs is not None:  # where sampled tokens land, and when they have
            self.tokens_host = torch.empty(config.max_num_seqs, dtype=torch.long,
                                           pin_memory=True)
            self.tokens_copied = torch.cuda.Event()
        self.ahead: Ahead | None = None  # the next decode step, queued before it was scheduled
        self.sampler = Sampler()
        # CPU steps pick their thread count by timing; a GPU step has nothing to choose.
        self.step_threads = StepThreads(torch.get_num_threads() if self.device.type == "cpu" else 1)
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, Detokenizer] = {}
        self.last_batch_tokens = 0

    def run(self, plan: StepPlan) -> StepReport:
        """One lockstep step: the plan's changes, a step of the model, then what rank 0 needs."""
        deltas = self.apply(plan)
        deltas.extend(self.step(plan.can_borrow, plan.senior))
        notices = tuple(CreditorNotice(self.rank, creditor, update)
                        for creditor, update in self.rmanager.end_step().items())
        return StepReport(tuple(deltas), self.heartbeat(), notices,
                          self.scheduler.num_preemptions)

    def apply(self, plan: StepPlan) -> list[RequestDelta]:
        for notice in plan.notices:
            if notice.creditor == self.rank:
                self.rmanager.apply_update(notice.owner, notice.update)
        for lease in plan.leases:
            if lease.creditor == self.rank:
                self.rmanager.grant_lease(lease.debtor, lease.num_blocks)
            if lease.debtor == self.rank:
                self.rmanager.receive_lease(lease.creditor, lease.num_blocks)
        aborted = [d for d in map(self.abort, plan.aborts) if d is not None]
        if plan.migrations and self.cluster is not None:
            migrate(plan.migrations, self.requests, self.rmanager, self.rmanager.pool,
                    self.cluster)
        for assigned in plan.requests:
            if assigned.owner == self.rank:
                p = assigned.params
                self.add_request(Request(
                    assigned.request_id, list(assigned.prompt_token_ids), p, assigned.max_tokens,
                    self.eos_token_ids, make_generator(p.seed, self.device)))
        return aborted

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if self.tokenizer is not None:
            p = request.params
            self.detokenizers[request.request_id] = Detokenizer(
                self.tokenizer, p.stop, p.include_stop_str_in_output, p.skip_special_tokens
            )
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestDelta | None:
        """Stop a request this instance owns (None if it doesn't own it)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.finish(FinishReason.ABORT)
        return self._release(request, RequestDelta(request_id, (), "", (), FinishReason.ABORT))

    def heartbeat(self) -> Heartbeat:
        stats = self.rmanager.stats()
        bs = self.rmanager.block_size
        running, waiting = self.scheduler.running, self.scheduler.waiting
        unheld = sum(max(0, r.num_tokens - bs * sum(s.num_blocks for s in r.segments))
                     for r in running)
        return Heartbeat(
            instance=self.rank, total_blocks=stats.total, free_blocks=stats.free,
            own_blocks=stats.own, lent_blocks=stats.lent, borrowed_blocks=stats.borrowed,
            num_running=len(running), num_waiting=len(waiting),
            batch_tokens=self.last_batch_tokens,
            request_blocks=self.rmanager.own_blocks_by_request(), prefill_tokens=unheld,
            waiting_tokens=sum(r.num_tokens for r in waiting),
            head_tokens=waiting[0].num_tokens if waiting else 0,
            lenders=self.rmanager.lenders(),
            num_stalled=self.scheduler.num_stalled,
        )

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    @torch.inference_mode()
    def step(self, can_borrow: bool = False, senior: str | None = None) -> list[RequestDelta]:
        batch = self.scheduler.schedule(can_borrow, senior)
        self.last_batch_tokens = batch.total_tokens
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead.matches(batch.requests, batch.num_tokens):
            assert self.graphs is not None
            self.graphs.steps_ahead_used += 1
            for request in ahead.requests:
                request.num_computed_tokens += 1
        elif not self.attention.begin_step(batch.requests, batch.num_tokens):
            return []
        elif batch.total_tokens == 0:  # only other instances' rows to serve this step
            self.attention.serve_remote(self.model.config.num_layers)
            return []
        else:
            ahead = None
        with self.step_threads(batch.total_tokens):
            done, hidden = (ahead.requests, ahead.hidden) if ahead else self._forward(batch)
            if not done:
                return []
            logits = self.model.compute_logits(hidden)
            params = [r.params for r in done]
            tokens = self.sampler.pick(logits, params, [r.generator for r in done])
            result = self.sampler.result(logits, self._to_host(tokens, done, batch), params)
        return [
            self._postprocess(r, token, logprobs)
            for r, token, logprobs in zip(done, result.token_ids, result.logprobs)
        ]

    def _to_host(self, tokens: Tensor, done: list[Request], batch: ScheduledBatch) -> list[int]:
        """The sampled tokens as a list. On a GPU, when every request of a plain decode step
        will go on decoding as far as the host knows, the next step is queued (`launch_ahead`)
        between the copy of the tokens and the wait for it, so the GPU computes that step while
        the host handles this one's outputs and schedules."""
        if self.graphs is None:
            return tokens.tolist()
        host = self.tokens_host[: len(tokens)]
        host.copy_(tokens, non_blocking=True)
        self.tokens_copied.record()
        goes_on = (self.async_scheduling and not self.scheduler.waiting
                   and len(done) == len(batch.requests)
                   and all(r.params.logprobs is None and r.num_output_tokens + 1 < r.max_tokens
                           for r in done))
        if goes_on:
            self.ahead = self.graphs.launch_ahead(done, tokens)
        self.tokens_copied.synchronize()
        return host.tolist()

    def _forward(self, batch: ScheduledBatch) -> tuple[list[Request], Tensor]:
        """Run the model over the batch's tokens; returns the requests whose uncomputed tokens
        are all computed now (they sample) and the hidden state of each one's last token."""
        ids: list[int] = []
        positions: list[int] = []
        last_row: dict[str, int] = {}
        for request, n in zip(batch.requests, batch.num_tokens):
            lo = request.num_computed_tokens
            ids.extend(request.token_ids[lo : lo + n])
            positions.extend(range(lo, lo + n))
            last_row[request.request_id] = len(ids) - 1
        input_ids = to_device(ids, torch.long, self.device)
        pos = to_device(positions, torch.long, self.device)
        hidden = None if self.graphs is None else self.graphs.forward(input_ids, pos)
        if hidden is None:
            hidden = self.model(input_ids, pos, self.attention)
        for request, n in zip(batch.requests, batch.num_tokens):
            request.num_computed_tokens += n
        done = [r for r in batch.requests if r.num_uncomputed_tokens == 0]
        rows = [last_row[r.request_id] for r in done]
        if rows != list(range(len(hidden))):  # plain decode keeps every row, in order
            hidden = hidden[to_device(rows, torch.long, self.device)]
        return done, hidden

    def _postprocess(
        self, request: Request, token: int, logprobs: dict[int, float] | None
    ) -> RequestDelta:
        request.append_token(token)
        text = ""
        detok = self.detokenizers.get(request.request_id)
        if detok is not None:
            if detok.add(token):
                request.finish(FinishReason.STOP)
            text = detok.take(request.is_finished)
        delta = RequestDelta(
            request.request_id, (token,), text, (logprobs,) if logprobs is not None else (),
            request.finish_reason,
        )
        return self._release(request, delta) if request.is_finished else delta

    def _release(self, request: Request, delta: RequestDelta) -> RequestDelta:
        self.scheduler.finish(request)
        del self.requests[request.request_id]
        self.detokenizers.pop(request.request_id, None)
        return delta


def build_instance(config: EngineConfig, rank: int, cluster: Cluster | None) -> Instance:
    """Load the model and tokenizer and size the KV pool for one instance."""
    path = resolve_model(config.model)
    device, dtype = config.torch_device, config.torch_dtype
    device = rank_device(device, rank)
    torch.manual_seed(config.seed)
    if cluster is not None and device.type == "cpu":  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cluster.world_size))
    model = load_model(path, dtype, device, config.load_format)
    model.pack_cpu_weights()
    tokenizer = load_tokenizer(path)
    mc, bs = model.config, config.block_size
    num_blocks = config.num_kv_blocks
    if num_blocks is None:
        per_block = KVPool.bytes_per_block(mc.num_layers, bs, mc.num_kv_heads, mc.head_dim, dtype)
        num_blocks = _kv_budget_bytes(device, config.kv_cache_fraction) // per_block
        if num_blocks < 1:
            raise ConfigError("no memory left for the KV cache; set num_kv_blocks")
    logger.info("instance %d: KV pool of %d blocks of %d tokens", rank, num_blocks, bs)
    pool = KVPool(mc.num_layers, num_blocks, bs, mc.num_kv_heads, mc.head_dim, dtype, device)
    eos = set(mc.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return Instance(model, pool, tokenizer, config, frozenset(eos), rank, cluster)


def _kv_budget_bytes(device: torch.device, fraction: float | None) -> int:
    """Memory for the KV pool: a fraction of the GPU's free memory (after the weights), or of
    the machine's RAM on CPU (smaller by default: the CPU is shared with everything else)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (fraction or 0.9))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * (fraction or 0.02))
