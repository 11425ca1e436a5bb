"""ModelRunner: runs the model over one instance's steps, and decides how.

`forward(batch)` lays the step out (`attention.layout.lay_out`) and runs the model over it:
from a CUDA graph when the step is plain local decode and graphs exist, eagerly otherwise, or
not at all when the step queued ahead is this one. `sample` picks the tokens and starts their
copy to the host; `launch_ahead` may queue the next decode step before the host waits for them;
`tokens` waits. The runner never changes a request: the instance advances the counters and
appends the tokens.

Async scheduling (`launch_ahead`): while the host waits for a decode step's sampled tokens, the
next decode step of the same requests (which the scheduler reserved: `Scheduler.decode_ahead`)
is queued behind it from a graph, its input ids the sampled tokens still on the GPU. The host's
work between steps (outputs, scheduling, the next layout) then overlaps that step instead of the
GPU idling through it. The next `forward` uses it when the scheduler picked exactly that step
(`ScheduledBatch.is_decode_of`); otherwise it is dropped: the K/V it stored are the values the
recomputation stores, and finished requests' slots are written before any later owner of their
blocks writes them (one stream).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from infinite_llm.attention.dist import DistAttention
from infinite_llm.attention.layout import StepLayout, lay_out, to_device
from infinite_llm.comm import Cluster
from infinite_llm.config import SchedulerConfig
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.models.llama import LlamaForCausalLM
from infinite_llm.request import Request, ScheduledBatch
from infinite_llm.sampling import Sampler, SampleResult
from infinite_llm.worker.cuda_graphs import DecodeGraphs
from infinite_llm.worker.threads import StepThreads

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ahead:
    """A decode step queued before the scheduler chose it, and its hidden states."""

    batch: ScheduledBatch
    hidden: Tensor


@dataclass(frozen=True, slots=True)
class Sampled:
    """A step's picked tokens, on the device and on their way to the host."""

    requests: tuple[Request, ...]
    logits: Tensor
    tokens: Tensor


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, rmanager: RManager, cluster: Cluster | None,
                 config: SchedulerConfig) -> None:
        self.model = model
        self.rmanager = rmanager
        self.cluster = cluster
        pool = rmanager.pool
        mc = model.config
        self.attention = DistAttention(pool, cluster, mc.num_heads, mc.num_kv_heads,
                                       mc.head_dim)
        self.device = pool.k.device
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = DecodeGraphs(model, self.attention, config.max_num_seqs)
            start = time.perf_counter()
            self.graphs.capture_all(pool.num_blocks * pool.block_size)
            logger.info("rank %d: captured %d decode graphs in %.1f s", rmanager.instance,
                        len(self.graphs.graphs), time.perf_counter() - start)
            # where sampled tokens land, and when they have
            self.tokens_host = torch.empty(config.max_num_seqs, dtype=torch.long,
                                           pin_memory=True)
            self.tokens_copied = torch.cuda.Event()
        # Launching ahead needs graphs and no peers: a step of a cluster runs collectives that
        # every rank must enter in the same order.
        self.launches_ahead = (config.async_scheduling and cluster is None
                               and self.graphs is not None)
        self.ahead: Ahead | None = None
        self.steps_ahead = 0  # steps launched ahead, and those a later step used
        self.steps_ahead_used = 0
        self.sampler = Sampler()
        # CPU steps pick their thread count by timing; a GPU step has nothing to choose.
        self.step_threads = StepThreads(torch.get_num_threads() if self.device.type == "cpu" else 1)

    def forward(self, batch: ScheduledBatch) -> tuple[ScheduledBatch, Tensor | None]:
        """Run the model over the step. Returns the batch that ran (the step queued ahead,
        whose rows may be in another order, when it is this one) and the hidden states of its
        sampling requests' last tokens in its order; None when this instance computed no
        token of its own (nothing, or only its part in other owners' exchange)."""
        ahead, self.ahead = self.ahead, None
        if ahead is not None and batch.is_decode_of(ahead.batch):
            self.steps_ahead_used += 1
            return ahead.batch, ahead.hidden
        layout = lay_out(batch, self.rmanager, self.cluster, self.attention.heads)
        if layout.num_tokens == 0:
            if layout.exchange is not None:
                self.attention.serve_remote(layout, self.model.config.num_layers)
            return batch, None
        ids = [t for r, lo, n in zip(batch.requests, batch.starts, batch.num_tokens)
               for t in r.token_ids[lo : lo + n]]
        hidden = self._run(layout, to_device(ids, torch.long, self.device))
        return batch, hidden if layout.sample_rows is None else hidden[layout.sample_rows]

    def _run(self, layout: StepLayout, input_ids: Tensor) -> Tensor:
        if self.graphs is not None:
            hidden = self.graphs.replay(layout, input_ids)
            if hidden is not None:
                return hidden
        return self.model(input_ids, layout.positions, self.attention.bind(layout))

    def sample(self, requests: tuple[Request, ...], hidden: Tensor) -> Sampled:
        """Pick each request's next token from its row of `hidden`; on a GPU the copy of the
        tokens to the host starts now and `tokens` waits for it."""
        logits = self.model.compute_logits(hidden)
        tokens = self.sampler.pick(logits, [r.params for r in requests],
                                   [r.generator for r in requests])
        if self.graphs is not None:
            self.tokens_host[: len(tokens)].copy_(tokens, non_blocking=True)
            self.tokens_copied.record()
        return Sampled(requests, logits, tokens)

    def launch_ahead(self, batch: ScheduledBatch, tokens: Tensor) -> None:
        """Queue `batch`, a decode step whose input ids are `tokens` (on the device), if it
        replays from a graph; `forward` uses it when it is the next step."""
        layout = lay_out(batch, self.rmanager, None, self.attention.heads)
        assert self.graphs is not None
        hidden = self.graphs.replay(layout, tokens)
        if hidden is not None:
            self.ahead = Ahead(batch, hidden)
            self.steps_ahead += 1

    def tokens(self, sampled: Sampled) -> SampleResult:
        """The sampled tokens on the host, with the logprobs the requests asked for."""
        if self.graphs is None:
            token_ids = sampled.tokens.tolist()
        else:
            self.tokens_copied.synchronize()
            token_ids = self.tokens_host[: len(sampled.tokens)].tolist()
        return self.sampler.result(sampled.logits, token_ids,
                                   [r.params for r in sampled.requests])
