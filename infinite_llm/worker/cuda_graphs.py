"""Decode steps replayed from CUDA graphs.

An eager decode step of a 32-layer model launches ~1500 small kernels, and the host issuing them is
slower than the GPU running them. A captured graph launches them all at once. A graph fixes its
tensors' addresses and its launch shapes: each graph is captured over a `StepLayout` whose
tensors are this object's static buffers, and a step is replayed by copying its own layout's
contents into those buffers. Only plain local decode steps (`StepLayout.plain_decode`) replay;
prefill chunks and steps that exchange with other instances run eagerly.

Steps are padded to a bucket of rows (1, 2, 4, 8, then multiples of 16): padding rows have no keys
and the K/V slot `PAD_SLOT`, so they store nothing and their outputs are ignored. Each bucket gets a
graph per decode launch (a power-of-two split count and its key tiles). `capture_all` captures
every one a step can get when the instance starts, largest bucket first, so serving never stalls
on a capture (one the split rule picks later, once a kernel's occupancy is learned, is captured
at first use); all graphs share one memory pool, as only one runs at a time.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from infinite_llm.attention import PAD_SLOT, graph_decode_config, graph_decode_configs
from infinite_llm.attention.dist import DistAttention
from infinite_llm.attention.layout import StepLayout
from infinite_llm.kvcache.paged import PagedBatch
from infinite_llm.models.llama import LlamaForCausalLM

if TYPE_CHECKING:  # imports triton: CPU-only installs never need it
    from infinite_llm.kernels.decode import DecodeConfig


def buckets(max_rows: int) -> list[int]:
    """Row counts that get graphs: every step pads to the next one."""
    sizes = [n for n in (1, 2, 4, 8) if n < max_rows]
    sizes += range(16, max_rows, 16)
    return [*sizes, max_rows]


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

    def replay(self, layout: StepLayout, input_ids: Tensor) -> Tensor | None:
        """Hidden states of the step from a graph, or None when the step isn't plain decode
        (or has more rows than the largest bucket): the caller then runs the model eagerly."""
        if not layout.plain_decode or layout.num_tokens > self.buckets[-1]:
            return None
        batch = layout.local
        n = batch.num_rows
        rows = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(layout.positions)
        self.slots[:n].copy_(layout.slots)
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

    def _static_layout(self, rows: int, config: DecodeConfig) -> StepLayout:
        """The layout a graph of `rows` rows captures: views of the static buffers."""
        local = PagedBatch(
            cu_q_lens=self.cu_q_lens[: rows + 1], q_positions=self.positions[:rows],
            block_tables=self.block_tables[:rows], kv_starts=self.kv_starts[:rows],
            kv_lens=self.kv_lens[:rows], q_lens=[1] * rows, kv_lens_host=[0] * rows,
        )
        return StepLayout(num_tokens=rows, positions=self.positions[:rows], local=local,
                          slots=self.slots[:rows], kv_index=None, local_q=None,
                          sample_rows=None, merge=None, exchange=None, decode_launch=config)

    def _capture(self, rows: int, config: DecodeConfig) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm up (compiles kernels; writes this step's K/V, which the replay rewrites with the
        same values) and capture the forward over the first `rows` rows of the buffers."""
        layout = self._static_layout(rows, config)
        attention = self.attention.bind(layout)
        ids = self.input_ids[:rows]
        self.model(ids, layout.positions, attention)
        torch.cuda.current_stream().synchronize()
        graph = torch.cuda.CUDAGraph()
        # capture_begin/end on a side stream (what `torch.cuda.graph` does), without the
        # gc.collect() and allocator cache flush that `torch.cuda.graph` runs per graph.
        with torch.cuda.stream(self.capture_stream):
            graph.capture_begin(pool=self.memory)
            try:
                hidden = self.model(ids, layout.positions, attention)
            finally:
                graph.capture_end()
        return graph, hidden
