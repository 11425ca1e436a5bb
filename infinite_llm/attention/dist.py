"""DistAttention: the model's attention over a request's KV wherever its segments live.

`begin_step` lays the step out: this instance's rows (its requests' local segments), the slots of
new K/V stored here, and, when the cluster has several instances, one all_gather of
`ExchangeSummary`s telling each creditor which requests send queries and new K/V to it. Per
layer, `__call__` stores local K/V and, when anyone has remote work this step:
  1. one all_to_all sends queries and creditor-bound K/V to the creditors;
  2. creditors store that K/V and compute partials over the segments they host, all owners'
     rows in one batched call, and a second all_to_all returns `(out, lse)`;
  3. the owner computes its local partial and merges all partials exactly.
When nobody has remote work (always, with one instance) the layer is the local partial alone.
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from torch import Tensor

from infinite_llm.attention import AttentionOps, attention_ops
from infinite_llm.attention.reference import PagedBatch
from infinite_llm.comm import Cluster
from infinite_llm.cluster.messages import ExchangeSummary, RemoteRow
from infinite_llm.kvcache.pool import KVPool
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.request import Request


@dataclass(slots=True)
class _Rows:
    """Rows of a PagedBatch under construction, and the new K/V slots they write."""

    tables: list[list[int]] = field(default_factory=list)
    kv_starts: list[int] = field(default_factory=list)
    kv_lens: list[int] = field(default_factory=list)
    q_lens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)

    def add(self, blocks: list[int], seg_start: int, kv_len: int, q_start: int, q_len: int,
            new_kv: range, block_size: int) -> None:
        self.tables.append(blocks)
        self.kv_starts.append(seg_start)
        self.kv_lens.append(kv_len)
        self.q_lens.append(q_len)
        self.positions.extend(range(q_start, q_start + q_len))
        for p in new_kv:
            offset = p - seg_start
            self.slots.append(blocks[offset // block_size] * block_size + offset % block_size)

    def batch(self, device: torch.device) -> PagedBatch:
        width = max([len(t) for t in self.tables] + [1])
        # A flat list into a C array, not torch.tensor of nested lists (3x slower): at 256 rows
        # of long contexts the block tables cost milliseconds of every step.
        flat, padding = [], [0] * width
        for t in self.tables:
            flat += t
            flat += padding[: width - len(t)]
        tables = (torch.frombuffer(array("i", flat), dtype=torch.int32) if flat
                  else torch.zeros(0, dtype=torch.int32))  # frombuffer refuses empty buffers
        return PagedBatch(
            cu_q_lens=to_device(list(accumulate(self.q_lens, initial=0)), torch.long, device),
            q_positions=to_device(self.positions, torch.long, device),
            block_tables=tables.view(-1, width).to(device, non_blocking=True),
            kv_starts=to_device(self.kv_starts, torch.long, device),
            kv_lens=to_device(self.kv_lens, torch.long, device),
            q_lens=self.q_lens,
            kv_lens_host=self.kv_lens,
        )


class DistAttention:
    def __init__(self, pool: KVPool, rmanager: RManager, cluster: Cluster | None,
                 num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.pool = pool
        self.rmanager = rmanager
        self.cluster = cluster
        self.instance = rmanager.instance
        self.shape = (num_heads, num_kv_heads, head_dim)
        self.scale = head_dim**-0.5
        self.ops = attention_ops(pool.k.device)
        self.exchange = False
        # The step's layout, set by `begin_step` (none yet: CUDA graphs are captured at start).
        self._num_tokens = 0
        self._local: PagedBatch | None = None
        self._slots: Tensor | None = None
        self._kv_index: Tensor | None = None
        self._local_q: Tensor | None = None
        self._slots_of: list[tuple[Tensor, Tensor]] | None = None

    def begin_step(self, requests: list[Request], num_tokens: list[int]) -> bool:
        """Lay out a step in which request i computes its next `num_tokens[i]` tokens; returns
        whether this instance must run the model (own tokens, or a part in an exchange)."""
        bs, device = self.pool.block_size, self.pool.k.device
        local = _Rows()
        local_q: list[int] = []  # step token of each query in the local rows
        kv_index: list[int] = []  # step tokens whose K/V is stored here
        rows: dict[int, list[RemoteRow]] = defaultdict(list)
        q_out: dict[int, list[int]] = defaultdict(list)  # creditor -> step tokens sent as queries
        kv_out: dict[int, list[int]] = defaultdict(list)  # creditor -> step tokens whose K/V goes
        offset = 0
        for request, n in zip(requests, num_tokens):
            lo, hi = request.num_computed_tokens, request.num_computed_tokens + n
            for seg in request.segments:
                new = range(max(lo, seg.start), min(hi, seg.start + seg.num_blocks * bs))
                if seg.instance == self.instance:
                    local.add(seg.blocks, seg.start, min(hi - seg.start, seg.num_blocks * bs),
                              lo, n, new, bs)
                    local_q.extend(range(offset, offset + n))
                    kv_index.extend(offset + p - lo for p in new)
                else:
                    rows[seg.instance].append(RemoteRow(request.request_id, lo, n, seg.start,
                                                        seg.num_blocks, new.start,
                                                        max(new.start, new.stop)))
                    q_out[seg.instance].extend(range(offset, offset + n))
                    kv_out[seg.instance].extend(offset + p - lo for p in new)
            offset += n
        self._num_tokens = offset
        self._local = local.batch(device)
        self._slots = to_device(local.slots, torch.long, device)
        self._kv_index = _index_or_none(kv_index, offset, device)
        self._local_q = _index_or_none(local_q, offset, device)
        self.exchange = False
        if self.cluster is not None:
            summaries = self.cluster.all_gather(
                ExchangeSummary({c: tuple(r) for c, r in rows.items()}))
            self.exchange = any(s.rows for s in summaries)
            if self.exchange:
                self._plan_exchange(summaries, q_out, kv_out)
        self._merge_layout([local_q] + [q_out.get(j, []) for j in self._creditors()], device)
        return offset > 0 or self.exchange

    def plain_decode(self) -> tuple[PagedBatch, Tensor] | None:
        """The step's local rows and K/V slots when it is plain local decode (one query per row,
        one row per token in step order, nothing exchanged or merged): the steps a CUDA graph of
        the model may replay. None for any other step."""
        local = self._local
        if (self.exchange or self._local_q is not None or self._kv_index is not None
                or self._slots_of is not None or local.num_rows != self._num_tokens
                or any(n != 1 for n in local.q_lens)):
            return None
        return local, self._slots

    @contextmanager
    def fixed_step(self, batch: PagedBatch, slots: Tensor, ops: AttentionOps) -> Iterator[None]:
        """Layers run over the given plain-decode tensors with the given ops (a CUDA graph's
        static buffers and fixed launches, while it is captured); the step's own layout and
        ops come back afterwards."""
        saved = (self._local, self._slots, self._kv_index, self._local_q, self._slots_of,
                 self.exchange, self.ops)
        self._local, self._slots, self.ops = batch, slots, ops
        self._kv_index = self._local_q = self._slots_of = None
        self.exchange = False
        try:
            yield
        finally:
            (self._local, self._slots, self._kv_index, self._local_q, self._slots_of,
             self.exchange, self.ops) = saved

    def _creditors(self) -> list[int]:
        world = self.cluster.world_size if self.exchange and self.cluster is not None else 0
        return [j for j in range(world) if j != self.instance]

    def _merge_layout(self, sources: list[list[int]], device: torch.device) -> None:
        """Where each partial goes in the stacked `merge` input: a token's k-th partial (local
        rows first, then creditors in rank order) goes to slot k. None when the local rows
        already give every token exactly one partial and nothing else comes."""
        if sources[0] == list(range(self._num_tokens)) and not any(sources[1:]):
            self._slots_of = None
            return
        seen: dict[int, int] = defaultdict(int)
        self._slots_of = []
        for tokens in sources:
            slots = []
            for t in tokens:
                slots.append(seen[t])
                seen[t] += 1
            self._slots_of.append((to_device(slots, torch.long, device),
                                   to_device(tokens, torch.long, device)))
        self._num_slots = max(seen.values(), default=1)

    def _plan_exchange(self, summaries: list[ExchangeSummary], q_out: dict[int, list[int]],
                       kv_out: dict[int, list[int]]) -> None:
        """Host other owners' rows here and size both all_to_alls (counts in elements)."""
        bs, device = self.pool.block_size, self.pool.k.device
        heads, kv_heads, dim = self.shape
        hosted = _Rows()
        self._in_q = [0] * len(summaries)
        self._in_kv = [0] * len(summaries)
        for owner, summary in enumerate(summaries):
            if owner == self.instance:
                continue
            for row in summary.rows.get(self.instance, ()):
                seg = self.rmanager.host(owner, row.request_id, row.seg_start, row.seg_blocks)
                end = row.q_start + row.num_q
                hosted.add(seg.blocks, seg.start, min(end - seg.start, seg.num_blocks * bs),
                           row.q_start, row.num_q, range(row.kv_lo, row.kv_hi), bs)
                self._in_q[owner] += row.num_q
                self._in_kv[owner] += row.kv_hi - row.kv_lo
        self._hosted = hosted.batch(device)
        self._hosted_slots = to_device(hosted.slots, torch.long, device)
        world = len(summaries)
        self._q_out = [to_device(q_out.get(j, []), torch.long, device) for j in range(world)]
        self._kv_out = [to_device(kv_out.get(j, []), torch.long, device) for j in range(world)]
        self._send = [(len(q_out.get(j, ())) * heads + 2 * len(kv_out.get(j, ())) * kv_heads)
                      * dim for j in range(world)]
        self._recv = [(self._in_q[o] * heads + 2 * self._in_kv[o] * kv_heads) * dim
                      for o in range(world)]

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> out [T, heads, head_dim]."""
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        if self._kv_index is None:
            self.ops.store_kv(k_cache, v_cache, self._slots, k, v)
        else:
            self.ops.store_kv(k_cache, v_cache, self._slots, k[self._kv_index],
                              v[self._kv_index])
        # The local partial first: the GPU computes it while the exchange waits for the peers.
        local_q = q if self._local_q is None else q[self._local_q]
        out, lse = self.ops.paged_attention(local_q, k_cache, v_cache, self._local, self.scale)
        partials = self._exchange(layer, q, k, v) if self.exchange else []
        if self._slots_of is None:
            return out
        heads, _, dim = self.shape
        outs = q.new_zeros((self._num_slots, len(q), heads, dim), dtype=torch.float32)
        lses = q.new_full((self._num_slots, len(q), heads), float("-inf"), dtype=torch.float32)
        parts = [(out.float(), lse)] + [
            part.split([part.numel() // (dim + 1) * dim, part.numel() // (dim + 1)])
            for part in partials]
        for (slot, token), (o, s) in zip(self._slots_of, parts):
            outs[slot, token] = o.reshape(-1, heads, dim)
            lses[slot, token] = s.reshape(-1, heads)
        return self.ops.merge(outs, lses)[0].to(q.dtype)

    def serve_remote(self, num_layers: int) -> None:
        """A step with no tokens of this instance's own: only its part in each layer's exchange
        (the hosted rows' new K/V stored, their partials computed and sent back), without
        running the model over zero tokens, whose empty ops cost host time on every layer
        while the owners wait for this instance in each all_to_all."""
        heads, kv_heads, dim = self.shape
        q = self.pool.k.new_empty(0, heads, dim)
        kv = self.pool.k.new_empty(0, kv_heads, dim)
        for layer in range(num_layers):
            self._exchange(layer, q, kv, kv)

    def _exchange(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> list[Tensor]:
        """Steps 1 and 2 of the module docstring; returns, per creditor, its flat (out, lse)."""
        assert self.cluster is not None
        heads, kv_heads, dim = self.shape
        send = torch.cat([q.new_empty(0)] + [
            torch.cat([q[qi].flatten(), k[ki].flatten(), v[ki].flatten()])
            for qi, ki in zip(self._q_out, self._kv_out)
        ])
        recv = self.cluster.all_to_all(send, self._send, self._recv).split(self._recv)
        qs, ks, vs = [], [], []
        for part, nq, nkv in zip(recv, self._in_q, self._in_kv):
            pq, pk, pv = part.split([nq * heads * dim, nkv * kv_heads * dim, nkv * kv_heads * dim])
            qs.append(pq.view(nq, heads, dim))
            ks.append(pk.view(nkv, kv_heads, dim))
            vs.append(pv.view(nkv, kv_heads, dim))
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        self.ops.store_kv(k_cache, v_cache, self._hosted_slots, torch.cat(ks), torch.cat(vs))
        out, lse = self.ops.paged_attention(torch.cat(qs), k_cache, v_cache, self._hosted,
                                            self.scale)
        per_owner = torch.tensor(self._in_q).cumsum(0).tolist()
        chunks, start = [], 0
        for end in per_owner:
            chunks.append(torch.cat([out[start:end].float().flatten(), lse[start:end].flatten()]))
            start = end
        back = torch.cat([out.new_empty(0, dtype=torch.float32), *chunks])
        back_send = [n * heads * (dim + 1) for n in self._in_q]
        back_recv = [len(i) * heads * (dim + 1) for i in self._q_out]
        returned = self.cluster.all_to_all(back, back_send, back_recv).split(back_recv)
        return [returned[j] for j in self._creditors()]


def _index_or_none(index: list[int], n: int, device: torch.device) -> Tensor | None:
    """The index as a tensor, or None when it is simply 0..n-1 (no gather needed)."""
    if index == list(range(n)):
        return None
    return to_device(index, torch.long, device)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list as a tensor on `device`, queued behind the work in flight. `torch.tensor(values,
    device="cuda")` would first wait for the GPU to drain (a blocking copy); a non-blocking copy
    from pageable memory is staged by the driver before it returns, so the list may go at once."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
