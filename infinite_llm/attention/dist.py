"""DistAttention: the model's attention over a request's KV wherever its segments live.

A function of `(layout, layer, q, k, v)`: the step's `StepLayout` (`attention.layout`) says
where every token's K/V goes and which rows attend where; this object holds only what is fixed
for the instance's life (its pool, its cluster, the heads, the kernels). Per layer it stores the
local K/V and, when the layout has an exchange:
  1. one all_to_all sends queries and creditor-bound K/V to the creditors;
  2. creditors store that K/V and compute partials over the segments they host, all owners'
     rows in one batched call, and a second all_to_all returns `(out, lse)`;
  3. the owner computes its local partial and merges all partials exactly.
Without an exchange (always, with one instance) the layer is the local partial alone.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from infinite_llm.attention import AttentionOps, attention_ops, graph_decode_ops
from infinite_llm.attention.layout import Exchange, StepLayout
from infinite_llm.comm import Cluster
from infinite_llm.kvcache.pool import KVPool


class DistAttention:
    def __init__(self, pool: KVPool, cluster: Cluster | None, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> None:
        self.pool = pool
        self.cluster = cluster
        self.heads = (num_heads, num_kv_heads, head_dim)
        self.scale = head_dim**-0.5
        self.ops = attention_ops(pool.k.device)

    def bind(self, layout: StepLayout) -> partial[Tensor]:
        """The model's `AttentionFn` for one step: `(layer, q, k, v) -> out` over `layout`."""
        return partial(self, layout)

    def __call__(self, layout: StepLayout, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> out [T, heads, head_dim]."""
        # A CUDA graph's layout fixes the decode launch (only read while it is captured).
        ops = self.ops if layout.decode_launch is None else graph_decode_ops(layout.decode_launch)
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        if layout.kv_index is None:
            ops.store_kv(k_cache, v_cache, layout.slots, k, v)
        else:
            ops.store_kv(k_cache, v_cache, layout.slots, k[layout.kv_index],
                         v[layout.kv_index])
        # The local partial first: the GPU computes it while the exchange waits for the peers.
        local_q = q if layout.local_q is None else q[layout.local_q]
        out, lse = ops.paged_attention(local_q, k_cache, v_cache, layout.local, self.scale)
        partials = [] if layout.exchange is None else self._exchange(
            layout.exchange, ops, layer, q, k, v)
        if layout.merge is None:
            return out
        heads, _, dim = self.heads
        merge = layout.merge
        outs = q.new_zeros((merge.num_slots, len(q), heads, dim), dtype=torch.float32)
        lses = q.new_full((merge.num_slots, len(q), heads), float("-inf"), dtype=torch.float32)
        parts = [(out.float(), lse)] + [
            part.split([part.numel() // (dim + 1) * dim, part.numel() // (dim + 1)])
            for part in partials]
        for (slot, token), (o, s) in zip(merge.places, parts):
            outs[slot, token] = o.reshape(-1, heads, dim)
            lses[slot, token] = s.reshape(-1, heads)
        return ops.merge(outs, lses)[0].to(q.dtype)

    def serve_remote(self, layout: StepLayout, num_layers: int) -> None:
        """A step with no tokens of this instance's own: only its part in each layer's exchange
        (the hosted rows' new K/V stored, their partials computed and sent back), without
        running the model over zero tokens, whose empty ops cost host time on every layer
        while the owners wait for this instance in each all_to_all."""
        assert layout.exchange is not None
        heads, kv_heads, dim = self.heads
        q = self.pool.k.new_empty(0, heads, dim)
        kv = self.pool.k.new_empty(0, kv_heads, dim)
        for layer in range(num_layers):
            self._exchange(layout.exchange, self.ops, layer, q, kv, kv)

    def _exchange(self, ex: Exchange, ops: AttentionOps, layer: int, q: Tensor, k: Tensor,
                  v: Tensor) -> list[Tensor]:
        """Steps 1 and 2 of the module docstring; returns, per peer, its flat (out, lse)."""
        assert self.cluster is not None
        heads, kv_heads, dim = self.heads
        send = torch.cat([q.new_empty(0)] + [
            torch.cat([q[qi].flatten(), k[ki].flatten(), v[ki].flatten()])
            for qi, ki in zip(ex.q_out, ex.kv_out)
        ])
        recv = self.cluster.all_to_all(send, list(ex.send), list(ex.recv)).split(ex.recv)
        qs, ks, vs = [], [], []
        for part, nq, nkv in zip(recv, ex.in_q, ex.in_kv):
            pq, pk, pv = part.split([nq * heads * dim, nkv * kv_heads * dim, nkv * kv_heads * dim])
            qs.append(pq.view(nq, heads, dim))
            ks.append(pk.view(nkv, kv_heads, dim))
            vs.append(pv.view(nkv, kv_heads, dim))
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        ops.store_kv(k_cache, v_cache, ex.hosted_slots, torch.cat(ks), torch.cat(vs))
        out, lse = ops.paged_attention(torch.cat(qs), k_cache, v_cache, ex.hosted, self.scale)
        chunks, start = [], 0
        for n in ex.in_q:
            end = start + n
            chunks.append(torch.cat([out[start:end].float().flatten(), lse[start:end].flatten()]))
            start = end
        back = torch.cat([out.new_empty(0, dtype=torch.float32), *chunks])
        returned = self.cluster.all_to_all(back, list(ex.back_send), list(ex.back_recv))
        split = returned.split(ex.back_recv)
        return [split[j] for j in ex.peers]
