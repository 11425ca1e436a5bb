"""LLMEngine: add_request / step / abort over the cluster's instances.

The engine is the frontend: it validates and tokenizes requests, hands each to an owner instance,
steps the instances and folds their deltas into cumulative `RequestOutput`s. With one instance
everything runs in this process; the multi-instance cluster keeps this interface.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from infinite_llm.cluster.instance import Instance
from infinite_llm.config import ConfigError, EngineConfig, ModelConfig
from infinite_llm.engine.output import CompletionOutput, RequestOutput
from infinite_llm.kvcache.pool import KVPool
from infinite_llm.kvcache.rmanager import KVStats
from infinite_llm.models.loader import load_model, load_tokenizer, resolve_model
from infinite_llm.request import Request
from infinite_llm.sampling import SamplingParams, make_generator

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request cannot be served as asked (empty, too long, duplicate id, no tokenizer...)."""


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        path = resolve_model(config.model)
        device, dtype = config.torch_device, config.torch_dtype
        self.model = load_model(path, dtype, device)
        self.model_config: ModelConfig = self.model.config
        self.tokenizer = load_tokenizer(path)
        pool = self._make_pool(device, dtype)
        self.max_model_len = self._max_model_len(pool)
        self.instances = [
            Instance(self.model, pool, self.tokenizer, config.max_num_batched_tokens,
                     config.max_num_seqs)
        ]
        self.outputs: dict[str, RequestOutput] = {}
        self._ids = itertools.count()
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)

    def _make_pool(self, device: torch.device, dtype: torch.dtype) -> KVPool:
        mc, bs = self.model_config, self.config.block_size
        num_blocks = self.config.num_kv_blocks
        if num_blocks is None:
            per_block = KVPool.bytes_per_block(
                mc.num_layers, bs, mc.num_kv_heads, mc.head_dim, dtype
            )
            num_blocks = _kv_budget_bytes(device, self.config.kv_cache_fraction) // per_block
            if num_blocks < 1:
                raise ConfigError("no memory left for the KV cache; set num_kv_blocks")
        logger.info("KV pool: %d blocks of %d tokens", num_blocks, bs)
        return KVPool(mc.num_layers, num_blocks, bs, mc.num_kv_heads, mc.head_dim, dtype, device)

    def _max_model_len(self, pool: KVPool) -> int:
        """The longest sequence served: the model's limit, capped by what the pool can hold."""
        mc = self.model_config
        limits = [mc.max_position_embeddings, pool.num_blocks * pool.block_size]
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
        """Queue a request; raises RequestError when it can never be served. Returns its id."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.outputs:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this engine serves at most "
                f"{self.max_model_len} tokens per request (prompt + output), so at most "
                f"{self.max_model_len - 1} prompt tokens"
            )
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        request = Request(
            request_id, ids, params, max_tokens, self.eos_token_ids,
            make_generator(params.seed, self.config.torch_device),
        )
        self.outputs[request_id] = RequestOutput(
            request_id, prompt if isinstance(prompt, str) else None, ids,
            [CompletionOutput(0, "", [], None, [] if params.logprobs is not None else None)],
        )
        self.instances[0].add_request(request)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored."""
        for instance in self.instances:
            delta = instance.abort(request_id)
            if delta is not None:
                self.outputs.pop(request_id).apply(delta)

    def step(self) -> list[RequestOutput]:
        """Run one step on every instance; returns the outputs that changed (finished ones last
        time they appear)."""
        changed: list[RequestOutput] = []
        for instance in self.instances:
            for delta in instance.step():
                output = self.outputs[delta.request_id]
                output.apply(delta)
                changed.append(output)
                if output.finished:
                    del self.outputs[delta.request_id]
        return changed

    def has_unfinished_requests(self) -> bool:
        return any(instance.num_unfinished for instance in self.instances)

    def kv_stats(self) -> list[KVStats]:
        return [instance.kv_stats() for instance in self.instances]

    @property
    def num_preemptions(self) -> int:
        return sum(i.scheduler.num_preemptions for i in self.instances)


def engine_config(model: str | None, options: dict[str, Any]) -> EngineConfig:
    """EngineConfig from keyword options, with a clear error for an unknown one."""
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown engine options {unknown}; known: {sorted(known - {'model'})}")
    return EngineConfig(model=model, **options)


def _kv_budget_bytes(device: torch.device, fraction: float | None) -> int:
    """Memory for the KV pool: a fraction of the GPU's free memory (after the weights), or of
    the machine's RAM on CPU (smaller by default: the CPU is shared with everything else)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * (fraction or 0.9))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * (fraction or 0.02))
