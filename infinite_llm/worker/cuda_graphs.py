"""Decode steps replayed from CUDA graphs.

An eager decode step of a 32-layer model launches ~1500 small kernels, and the host issuing them is
slower than the GPU running them. A captured graph launches them all at once. A graph fixes its
tensors' addresses and its launch shapes, so a step is replayed only when it is plain local decode
(`DistAttention.plain_decode`: one query per request, all KV local, nothing merged); prefill
chunks and steps that exchange with other instances run eagerly.

Steps are padded to a bucket of rows (1, 2, 4, 8, then multiples of 16): padding rows have no keys
and the K/V slot `PAD_SLOT`, so they store nothing and their outputs are ignored. Each bucket gets a
graph per decode launch (a power-of-two split count and its key tiles). `capture_all` captures
every one a step can get when the instance starts, largest bucket first, so serving never stalls
on a capture (one the split rule picks later, once a kernel's occupancy is learned, is captured
at first use); all graphs share one memory pool, as only one runs at a time.

While the host waits for a decode step's sampled tokens, the next decode step of the same
requests is already queued behind it (`launch_ahead`): its input ids are the sampled tokens,
still on the GPU. The host's work between steps (outputs, scheduling, the next step's layout)
then runs while the GPU computes that step, instead of the GPU idling through it. The next step
uses it when the scheduler picks exactly those requests again (`Ahead.matches`); otherwise it is
dropped: the K/V it stored are the same values the recomputation stores, and finished requests'
slots are written before any later owner of their blocks writes them (one stream).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from infinite_llm.attention import (
    PAD_SLOT,
    graph_decode_config,
    graph_decode_configs,
    graph_decode_ops,
)
from infinite_llm.attention.dist import DistAttention, to_device
from infinite_llm.attention.reference import PagedBatch
from infinite_llm.models.llama import LlamaForCausalLM
from infinite_llm.request import Request

if TYPE_CHECKING:  # imports triton: CPU-only installs never need it
    from infinite_llm.attention.triton.decode import DecodeConfig


def buckets(max_rows: int) -> list[int]:
    """Row counts that get graphs: every step pads to the next one."""
    sizes = [n for n in (1, 2, 4, 8) if n < max_rows]
    sizes += range(16, max_rows, 16)
    return [*sizes, max_rows]


@dataclass(slots=True)
class Ahead:
    """A decode step queued before the scheduler chose it: requests' rows in `hidden` and the
    position each computes."""

    requests: list[Request]
    positions: list[int]
    hidden: Tensor

    def matches(self, requests: list[Request], num_tokens: list[int]) -> bool:
        """Whether the scheduled step is this one: the same requests (in any order), each
        computing its next token at the position computed ahead."""
        return (len(requests) == len(self.requests) and all(n == 1 for n in num_tokens)
                and {id(r) for r in requests} == {id(r) for r in self.requests}
                and all(r.num_computed_tokens == p and r.num_uncomputed_tokens == 1
                        for r, p in zip(self.requests, self.positions)))


class DecodeGraphs:
    """The model's forward over plain decode steps of up to `max_rows` requests, from graphs."""

    def __init__(self, model: LlamaForCausalLM, attention: DistAttention, max_rows: int) -> None:
        self.model = model
        self.attention = attention
        self.buckets = buckets(max_rows)
        pool = attention.pool
        device = pool.k.device
        self.input_ids = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=device)  # = q positions
        self.slots = torch.full((max_rows,), PAD_SLOT, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_rows, pool.num_blocks, dtype=torch.int32,
                                        device=device)
        self.kv_starts = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.kv_lens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.cu_q_lens = torch.arange(max_rows + 1, dtype=torch.long, device=device)
        # q's shape, what the decode launch depends on: sliced to a step's rows, never read
        self.q_probe = pool.k.new_empty(max_rows, model.config.num_heads, model.config.head_dim)
        # (bucket, decode launch) -> the graph and its output
        self.graphs: dict[tuple[int, DecodeConfig], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.memory = torch.cuda.graph_pool_handle()
        self.capture_stream = torch.cuda.Stream(device)
        self.replays: Counter[tuple[int, DecodeConfig]] = Counter()
        self.steps_ahead = 0  # steps launched ahead; `Instance` counts those it used
        self.steps_ahead_used = 0

    def launch_ahead(self, requests: list[Request], tokens: Tensor) -> Ahead | None:
        """Queue the decode step that feeds each request its sampled token (`tokens`, on the
        GPU, not yet known to the host), or None when the pool lacks a block it needs or the
        step isn't plain decode. The blocks it takes are those the scheduler would take."""
        rmanager = self.attention.rmanager
        if sum(rmanager.blocks_needed(r, 1) for r in requests) > rmanager.pool.num_free:
            return None
        for request in requests:
            rmanager.reserve(request, 1)
        if not self.attention.begin_step(requests, [1] * len(requests)):
            return None
        positions = [r.num_computed_tokens for r in requests]
        hidden = self.forward(tokens, to_device(positions, torch.long, tokens.device))
        if hidden is None:
            return None
        self.steps_ahead += 1
        return Ahead(requests, positions, hidden)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor | None:
        """Hidden states of this step from a graph, or None when the step isn't plain decode
        (or has more rows than the largest bucket): the caller then runs the model eagerly."""
        step = self.attention.plain_decode()
        if step is None or step[0].num_rows > self.buckets[-1]:
            return None
        batch, slots = step
        n = batch.num_rows
        rows = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        width = batch.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(batch.block_tables)
        self.kv_starts[:n].copy_(batch.kv_starts)
        self.kv_lens[:n].copy_(batch.kv_lens)
        if n < rows:  # padding rows: no keys, nothing stored
            self.slots[n:rows].fill_(PAD_SLOT)
            self.kv_lens[n:rows].zero_()
        config = graph_decode_config(self.q_probe[:rows], self.attention.pool.k[0],
                                     max(batch.kv_lens_host))
        key = (rows, config)
        if key not in self.graphs:
            self.graphs[key] = self._capture(rows, config)
        graph, hidden = self.graphs[key]
        graph.replay()
        self.replays[key] += 1
        return hidden[:n]

    def capture_all(self, max_kv: int) -> None:
        """Capture the graph of every (bucket, decode launch) that a plain decode step with up
        to `max_kv` keys per row gets from the split rule now."""
        for rows in reversed(self.buckets):  # the largest first: it sizes the shared pool
            for config in graph_decode_configs(self.q_probe[:rows], self.attention.pool.k[0],
                                               max_kv):
                if (rows, config) not in self.graphs:
                    self.graphs[rows, config] = self._capture(rows, config)

    def _capture(self, rows: int, config: DecodeConfig) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm up (compiles kernels; writes this step's K/V, which the replay rewrites with the
        same values) and capture the forward over the first `rows` rows of the buffers."""
        batch = PagedBatch(
            cu_q_lens=self.cu_q_lens[: rows + 1], q_positions=self.positions[:rows],
            block_tables=self.block_tables[:rows], kv_starts=self.kv_starts[:rows],
            kv_lens=self.kv_lens[:rows], q_lens=[1] * rows, kv_lens_host=[0] * rows,
        )
        ops = graph_decode_ops(config)
        ids, positions = self.input_ids[:rows], self.positions[:rows]
        with self.attention.fixed_step(batch, self.slots[:rows], ops):
            self.model(ids, positions, self.attention)
            torch.cuda.current_stream().synchronize()
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end on a side stream (what `torch.cuda.graph` does), without the
            # gc.collect() and allocator cache flush that `torch.cuda.graph` runs per graph.
            with torch.cuda.stream(self.capture_stream):
                graph.capture_begin(pool=self.memory)
                try:
                    hidden = self.model(ids, positions, self.attention)
                finally:
                    graph.capture_end()
        return graph, hidden
