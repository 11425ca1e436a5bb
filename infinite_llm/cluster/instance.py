"""One instance: the model, its KV pool and rManager, its scheduler, and the step that runs them.

A step reads aloud: schedule -> forward -> sample -> postprocess. The instance owns its requests
from admission to finish; what changed in a step leaves as `RequestDelta`s.
"""

from __future__ import annotations

from typing import Any

import torch

from infinite_llm.attention.dist import DistAttention
from infinite_llm.engine.output import Detokenizer, RequestDelta
from infinite_llm.engine.scheduler import ScheduledBatch, Scheduler
from infinite_llm.kvcache.pool import KVPool
from infinite_llm.kvcache.rmanager import KVStats, RManager
from infinite_llm.models.llama import LlamaForCausalLM
from infinite_llm.request import FinishReason, Request
from infinite_llm.sampling import Sampler


class Instance:
    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVPool,
        tokenizer: Any,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        rank: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.rank = rank
        self.rmanager = RManager(pool, rank)
        self.scheduler = Scheduler(self.rmanager, max_num_batched_tokens, max_num_seqs)
        self.attention = DistAttention(pool, rank, model.config.head_dim)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, Detokenizer] = {}
        self.device = pool.k.device

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if self.tokenizer is not None:
            p = request.params
            self.detokenizers[request.request_id] = Detokenizer(
                self.tokenizer, p.stop, p.include_stop_str_in_output, p.skip_special_tokens
            )
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestDelta | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.finish(FinishReason.ABORT)
        return self._release(request, RequestDelta(request_id, (), "", (), FinishReason.ABORT))

    def kv_stats(self) -> KVStats:
        return self.rmanager.stats()

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    @torch.inference_mode()
    def step(self) -> list[RequestDelta]:
        batch = self.scheduler.schedule()
        if not batch.requests:
            return []
        hidden, last_token_rows = self._forward(batch)
        done = [r for r in batch.requests if r.num_uncomputed_tokens == 0]
        if not done:
            return []
        rows = torch.tensor([last_token_rows[r.request_id] for r in done], device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        result = self.sampler(logits, [r.params for r in done], [r.generator for r in done])
        return [
            self._postprocess(r, token, logprobs)
            for r, token, logprobs in zip(done, result.token_ids, result.logprobs)
        ]

    def _forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, dict[str, int]]:
        """Run the model over the batch's tokens; returns hidden states and each request's
        last row."""
        ids: list[int] = []
        positions: list[int] = []
        last_row: dict[str, int] = {}
        for request, n in zip(batch.requests, batch.num_tokens):
            lo = request.num_computed_tokens
            ids.extend(request.token_ids[lo : lo + n])
            positions.extend(range(lo, lo + n))
            last_row[request.request_id] = len(ids) - 1
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.attention.begin_step(batch.requests, batch.num_tokens, pos)
        hidden = self.model(input_ids, pos, self.attention)
        for request, n in zip(batch.requests, batch.num_tokens):
            request.num_computed_tokens += n
        return hidden, last_row

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
