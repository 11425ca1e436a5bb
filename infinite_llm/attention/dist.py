"""DistAttention: the model's attention over a request's KV wherever its segments live.

For each step, `begin_step` turns the batch into a `PagedBatch` over this instance's segments and
the slots of the step's new tokens. Per layer, `__call__` stores the new K/V, computes this
instance's partial `(out, lse)` and merges it with the partials of other instances' segments.
With every segment local (one instance), the local partial is the whole attention and nothing is
exchanged or merged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infinite_llm.attention.reference import PagedBatch, paged_attention, store_kv
from infinite_llm.kvcache.pool import KVPool
from infinite_llm.request import Request


class RemoteSegmentError(NotImplementedError):
    """A request has KV on another instance, which needs the multi-instance exchange."""


class DistAttention:
    def __init__(self, pool: KVPool, instance: int, head_dim: int) -> None:
        self.pool = pool
        self.instance = instance
        self.scale = head_dim**-0.5
        self._batch: PagedBatch | None = None
        self._slots: Tensor | None = None

    def begin_step(self, requests: list[Request], num_tokens: list[int], positions: Tensor) -> None:
        """Describe the step: request i computes its next `num_tokens[i]` tokens."""
        block_size = self.pool.block_size
        slots: list[int] = []
        tables: list[list[int]] = []
        kv_starts: list[int] = []
        kv_lens: list[int] = []
        for request, n in zip(requests, num_tokens):
            lo, hi = request.num_computed_tokens, request.num_computed_tokens + n
            local = [s for s in request.segments if s.instance == self.instance]
            if len(local) != len(request.segments):
                raise RemoteSegmentError(
                    f"request {request.request_id} has KV on other instances"
                )
            blocks = [b for s in local for b in s.blocks]
            slots.extend(blocks[p // block_size] * block_size + p % block_size
                         for p in range(lo, hi))
            tables.append(blocks)
            kv_starts.append(0)
            kv_lens.append(hi)
        device = positions.device
        width = max(len(t) for t in tables)
        q_lens = list(num_tokens)
        self._slots = torch.tensor(slots, dtype=torch.long, device=device)
        self._batch = PagedBatch(
            cu_q_lens=torch.tensor([0, *q_lens], device=device).cumsum(0),
            q_positions=positions,
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                      dtype=torch.int32, device=device),
            kv_starts=torch.tensor(kv_starts, dtype=torch.long, device=device),
            kv_lens=torch.tensor(kv_lens, dtype=torch.long, device=device),
            q_lens=q_lens,
            kv_lens_host=kv_lens,
        )

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> out [T, heads, head_dim]."""
        assert self._batch is not None and self._slots is not None, "begin_step() first"
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        store_kv(k_cache, v_cache, self._slots, k, v)
        out, _ = paged_attention(q, k_cache, v_cache, self._batch, self.scale)
        return out
