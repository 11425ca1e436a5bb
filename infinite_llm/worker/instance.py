"""One instance: the model, its KV pool and rManager, its scheduler, and the step that runs them.

A step reads aloud (`Instance.step`): schedule -> forward -> advance -> sample -> postprocess.
The scheduler picks the batch, the `ModelRunner` runs the model over it (eagerly, from a CUDA
graph, or not at all when it queued that step ahead), the requests' counters advance, the runner
samples and, when the next step is sure to be the same requests decoding on, queues it before
the host waits for this step's tokens. The instance owns its requests from admission to finish;
what changed leaves as `RequestDelta`s. What rank 0 plans for a step and what it hears back are
the cluster's business (`cluster.driver.run_plan`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from infinite_llm.comm import Cluster, rank_device
from infinite_llm.config import ConfigError, EngineConfig, SchedulerConfig
from infinite_llm.kvcache.pool import KVPool
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.models.llama import LlamaForCausalLM
from infinite_llm.models.loader import load_model, load_tokenizer, resolve_model
from infinite_llm.outputs import Detokenizer, RequestDelta
from infinite_llm.request import FinishReason, Request, ScheduledBatch
from infinite_llm.sampling import SamplingParams, make_generator
from infinite_llm.worker.migration import Move, migrate
from infinite_llm.worker.runner import ModelRunner
from infinite_llm.worker.scheduler import Scheduler

logger = logging.getLogger(__name__)


class Instance:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, tokenizer: Any,
                 config: SchedulerConfig, eos_token_ids: frozenset[int], rank: int = 0,
                 cluster: Cluster | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.rank = rank
        self.cluster = cluster
        self.eos_token_ids = eos_token_ids
        self.device = pool.k.device
        self.rmanager = RManager(pool, rank)
        self.scheduler = Scheduler(self.rmanager, config.max_num_batched_tokens,
                                   config.max_num_seqs)
        self.runner = ModelRunner(model, self.rmanager, cluster, config)
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, Detokenizer] = {}
        self.last_batch_tokens = 0

    @torch.inference_mode()
    def step(self, can_borrow: bool = False, senior: str | None = None) -> list[RequestDelta]:
        """schedule -> forward -> advance -> sample (-> queue the next decode) -> postprocess."""
        batch = self.scheduler.schedule(can_borrow, senior)
        self.last_batch_tokens = batch.total_tokens
        with self.runner.step_threads(batch.total_tokens):
            batch, hidden = self.runner.forward(batch)
            for request, n in zip(batch.requests, batch.num_tokens):
                request.num_computed_tokens += n
            if hidden is None or not batch.sampling:
                return []
            sampled = self.runner.sample(batch.sampling, hidden)
            following = self._decode_ahead(batch)
            if following is not None:
                self.runner.launch_ahead(following, sampled.tokens)
            result = self.runner.tokens(sampled)
        return [self._postprocess(r, token, logprobs)
                for r, token, logprobs in zip(sampled.requests, result.token_ids,
                                              result.logprobs)]

    def _decode_ahead(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The next decode step of `batch`'s requests, reserved, when the runner queues steps
        ahead and, as far as the host knows, every request goes on decoding (logprobs are
        computed from the host's tokens, so a request asking for them is not queued ahead)."""
        if not self.runner.launches_ahead or any(
                r.params.logprobs is not None or r.num_output_tokens + 1 >= r.max_tokens
                for r in batch.requests):
            return None
        return self.scheduler.decode_ahead(batch)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    max_tokens: int) -> None:
        request = Request(request_id, prompt_token_ids, params, max_tokens, self.eos_token_ids,
                          make_generator(params.seed, self.device))
        self.requests[request_id] = request
        if self.tokenizer is not None:
            self.detokenizers[request_id] = Detokenizer(
                self.tokenizer, params.stop, params.include_stop_str_in_output,
                params.skip_special_tokens)
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestDelta | None:
        """Stop a request this instance owns (None if it doesn't own it)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.finish(FinishReason.ABORT)
        return self._release(request, RequestDelta(request_id, (), "", (), FinishReason.ABORT))

    def migrate(self, migrations: tuple[Move, ...]) -> None:
        """Take part in the plan's KV migrations (every rank does, in plan order)."""
        if self.cluster is not None:
            migrate(migrations, self.requests, self.rmanager, self.rmanager.pool, self.cluster)

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

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
    path = resolve_model(config.load.model)
    device, dtype = config.load.torch_device, config.load.torch_dtype
    device = rank_device(device, rank)
    torch.manual_seed(config.load.seed)
    if cluster is not None and device.type == "cpu":  # ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cluster.world_size))
    model = load_model(path, dtype, device, config.load.load_format)
    model.process_weights_after_loading()
    tokenizer = load_tokenizer(path)
    mc, bs = model.config, config.cache.block_size
    num_blocks = config.cache.num_kv_blocks
    if num_blocks is None:
        per_block = KVPool.bytes_per_block(mc.num_layers, bs, mc.num_kv_heads, mc.head_dim, dtype)
        num_blocks = _kv_budget_bytes(device, config.cache.kv_cache_fraction) // per_block
        if num_blocks < 1:
            raise ConfigError("no memory left for the KV cache; set num_kv_blocks")
    logger.info("instance %d: KV pool of %d blocks of %d tokens", rank, num_blocks, bs)
    pool = KVPool(mc.num_layers, num_blocks, bs, mc.num_kv_heads, mc.head_dim, dtype, device)
    eos = set(mc.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return Instance(model, pool, tokenizer, config.scheduler, frozenset(eos), rank, cluster)


def _kv_budget_bytes(device: torch.device, fraction: float | None) -> int:
    """Memory for the KV pool: a fraction of the GPU's free memory (after the weights), or of
    the machine's RAM on CPU (smaller by default: the CPU is shared with everything else)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (fraction or 0.9))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * (fraction or 0.02))
