"""A step's layout: everything about a step that is the same in every layer, built once.

`lay_out` turns the scheduler's `ScheduledBatch` into a frozen `StepLayout`: the model's token
positions, this instance's rows (its requests' local segments) with the slots of the new K/V
stored here, which rows' hidden states sample, and, when the cluster has several instances, the
step's part in the exchange with the others. For that part one all_gather of
`ExchangeSummary`s tells each creditor which requests send queries and new K/V to it; the
creditor then hosts those rows (its rManager grows the segments from the owner's lease) and both
sides size their all_to_alls. Attention (`attention.dist`) is then a function of
`(layout, layer, q, k, v)`; nothing is left behind between steps.

A CUDA graph captures a layout whose tensors are static buffers and replays it after copying a
new step's contents into them (`worker.cuda_graphs`). Every tensor a layer reads is here, so the
same holds for an exchanging step once its per-peer counts are padded to fixed buckets: padded
K/V rows carry `PAD_SLOT`, padded query rows no keys, and the all_to_all sizes become static.
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from infinite_llm.comm import Cluster
from infinite_llm.kvcache.paged import PagedBatch
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.request import ScheduledBatch

if TYPE_CHECKING:  # imports triton: CPU-only installs never need it
    from infinite_llm.kernels.decode import DecodeConfig


@dataclass(frozen=True, slots=True)
class RemoteRow:
    """One request's work on a creditor this step: its queries, and new KV written there."""

    request_id: str
    q_start: int  # absolute position of the first query
    num_q: int
    seg_start: int  # first position of the request's segment on the creditor
    seg_blocks: int  # the segment's size after this step
    kv_lo: int  # new K/V for positions kv_lo .. kv_hi - 1 are stored on the creditor
    kv_hi: int


@dataclass(frozen=True, slots=True)
class ExchangeSummary:
    """What one instance sends to each creditor this step (by creditor rank)."""

    rows: dict[int, tuple[RemoteRow, ...]]


@dataclass(frozen=True, slots=True)
class Exchange:
    """This instance's part in each layer's two all_to_alls (counts in elements, per rank).

    Out: queries and creditor-bound K/V of our step tokens (`q_out[j]`, `kv_out[j]` index the
    step's tokens for rank j). In: other owners' queries and K/V for the rows hosted here
    (`in_q[o]`, `in_kv[o]` tokens from owner o), computed over `hosted` and sent back as
    `(out, lse)` partials, which arrive from `peers` in rank order.
    """

    peers: tuple[int, ...]  # every other rank, in rank order
    q_out: tuple[Tensor, ...]  # [world] of [n_j] int64
    kv_out: tuple[Tensor, ...]  # [world] of [m_j] int64
    send: tuple[int, ...]
    recv: tuple[int, ...]
    in_q: tuple[int, ...]
    in_kv: tuple[int, ...]
    hosted: PagedBatch
    hosted_slots: Tensor  # [sum(in_kv)] int64
    back_send: tuple[int, ...]
    back_recv: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Merge:
    """Where each partial goes in the stacked input of the LSE merge: a token's k-th partial
    (local rows first, then creditors in rank order) goes to slot k."""

    num_slots: int
    places: tuple[tuple[Tensor, Tensor], ...]  # per source: (slot, step token) of each row


@dataclass(frozen=True, slots=True)
class StepLayout:
    num_tokens: int  # the step's tokens on this instance (its own requests')
    positions: Tensor  # [num_tokens] int64, each token's position in its sequence
    local: PagedBatch  # rows over segments held here
    slots: Tensor  # [tokens stored here] int64, K/V slot of each
    kv_index: Tensor | None  # step tokens whose K/V is stored here; None: all, in order
    local_q: Tensor | None  # step token of each local row's query; None: all, in order
    sample_rows: Tensor | None  # rows of the hidden states that sample; None: all, in order
    merge: Merge | None  # None: the local rows give every token its one partial
    exchange: Exchange | None  # None: nobody in the cluster exchanges this step
    decode_launch: DecodeConfig | None = None  # a CUDA graph's fixed decode launch

    @property
    def plain_decode(self) -> bool:
        """One query per row, one row per token in step order, all local, nothing merged: the
        steps a CUDA graph of the model replays."""
        return (self.exchange is None and self.local_q is None and self.kv_index is None
                and self.merge is None and self.sample_rows is None
                and self.local.num_rows == self.num_tokens
                and all(n == 1 for n in self.local.q_lens))


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

    def batch(self, device: torch.device, q_positions: Tensor | None = None) -> PagedBatch:
        """The rows on `device`; `q_positions`, when given, is their queries' positions there
        already (the step's positions, when the rows query every token in order)."""
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
            q_positions=(to_device(self.positions, torch.long, device) if q_positions is None
                         else q_positions),
            block_tables=tables.view(-1, width).to(device, non_blocking=True),
            kv_starts=to_device(self.kv_starts, torch.long, device),
            kv_lens=to_device(self.kv_lens, torch.long, device),
            q_lens=self.q_lens,
            kv_lens_host=self.kv_lens,
        )


def lay_out(batch: ScheduledBatch, rmanager: RManager, cluster: Cluster | None,
            heads: tuple[int, int, int]) -> StepLayout:
    """The layout of a step in which request i computes its tokens `batch.starts[i] ..
    + batch.num_tokens[i] - 1`. With a cluster, every rank calls this in the same step (one
    all_gather), and a creditor's rManager hosts the rows sent to it. `heads` is
    (num_heads, num_kv_heads, head_dim), which sizes the exchange."""
    bs, me, device = rmanager.block_size, rmanager.instance, rmanager.pool.k.device
    local = _Rows()
    positions: list[int] = []
    local_q: list[int] = []  # step token of each query in the local rows
    kv_index: list[int] = []  # step tokens whose K/V is stored here
    sample_rows: list[int] = []
    rows: dict[int, list[RemoteRow]] = defaultdict(list)
    q_out: dict[int, list[int]] = defaultdict(list)  # creditor -> step tokens sent as queries
    kv_out: dict[int, list[int]] = defaultdict(list)  # creditor -> step tokens whose K/V goes
    offset = 0
    for request, lo, n, samples in zip(batch.requests, batch.starts, batch.num_tokens,
                                       batch.samples):
        hi = lo + n
        positions.extend(range(lo, hi))
        for seg in request.segments:
            new = range(max(lo, seg.start), min(hi, seg.start + seg.num_blocks * bs))
            if seg.instance == me:
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
        if samples:
            sample_rows.append(offset - 1)
    exchange = None
    if cluster is not None:
        summaries = cluster.all_gather(ExchangeSummary({c: tuple(r) for c, r in rows.items()}))
        if any(s.rows for s in summaries):
            exchange = _exchange(summaries, q_out, kv_out, rmanager, heads)
    peers = exchange.peers if exchange is not None else ()
    step_positions = to_device(positions, torch.long, device)
    local_q_index = _index_or_none(local_q, offset, device)
    return StepLayout(
        num_tokens=offset,
        positions=step_positions,
        # Local rows that query every token in order have the step's positions: one copy.
        local=local.batch(device, step_positions if local_q_index is None else None),
        slots=to_device(local.slots, torch.long, device),
        kv_index=_index_or_none(kv_index, offset, device),
        local_q=local_q_index,
        sample_rows=_index_or_none(sample_rows, offset, device),
        merge=_merge([local_q] + [q_out.get(j, []) for j in peers], offset, device),
        exchange=exchange,
    )


def _merge(sources: list[list[int]], num_tokens: int, device: torch.device) -> Merge | None:
    """None when the local rows already give every token exactly one partial and nothing
    else comes."""
    if sources[0] == list(range(num_tokens)) and not any(sources[1:]):
        return None
    seen: dict[int, int] = defaultdict(int)
    places = []
    for tokens in sources:
        slots = []
        for t in tokens:
            slots.append(seen[t])
            seen[t] += 1
        places.append((to_device(slots, torch.long, device), to_device(tokens, torch.long, device)))
    return Merge(max(seen.values(), default=1), tuple(places))


def _exchange(summaries: list[ExchangeSummary], q_out: dict[int, list[int]],
              kv_out: dict[int, list[int]], rmanager: RManager,
              heads: tuple[int, int, int]) -> Exchange:
    """Host other owners' rows here and size both all_to_alls."""
    bs, me, device = rmanager.block_size, rmanager.instance, rmanager.pool.k.device
    num_heads, kv_heads, dim = heads
    world = len(summaries)
    hosted = _Rows()
    in_q, in_kv = [0] * world, [0] * world
    for owner, summary in enumerate(summaries):
        if owner == me:
            continue
        for row in summary.rows.get(me, ()):
            seg = rmanager.host(owner, row.request_id, row.seg_start, row.seg_blocks)
            end = row.q_start + row.num_q
            hosted.add(seg.blocks, seg.start, min(end - seg.start, seg.num_blocks * bs),
                       row.q_start, row.num_q, range(row.kv_lo, row.kv_hi), bs)
            in_q[owner] += row.num_q
            in_kv[owner] += row.kv_hi - row.kv_lo
    sent_q = [len(q_out.get(j, ())) for j in range(world)]
    sent_kv = [len(kv_out.get(j, ())) for j in range(world)]
    return Exchange(
        peers=tuple(j for j in range(world) if j != me),
        q_out=tuple(to_device(q_out.get(j, []), torch.long, device) for j in range(world)),
        kv_out=tuple(to_device(kv_out.get(j, []), torch.long, device) for j in range(world)),
        send=tuple((q * num_heads + 2 * kv * kv_heads) * dim for q, kv in zip(sent_q, sent_kv)),
        recv=tuple((q * num_heads + 2 * kv * kv_heads) * dim for q, kv in zip(in_q, in_kv)),
        in_q=tuple(in_q),
        in_kv=tuple(in_kv),
        hosted=hosted.batch(device),
        hosted_slots=to_device(hosted.slots, torch.long, device),
        back_send=tuple(n * num_heads * (dim + 1) for n in in_q),
        back_recv=tuple(n * num_heads * (dim + 1) for n in sent_q),
    )


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
