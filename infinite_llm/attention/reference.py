"""Partial attention over paged KV returning `(out, lse)`, and the exact LSE merge (pure torch).

This is the CPU path and the definition the GPU kernels are tested against. A *row* of a
`PagedBatch` is one sequence's queries attending to one contiguous run of KV (a segment) that lives
in this pool: keys at absolute positions `kv_start .. kv_start + kv_len - 1`, stored in the blocks
of the row's block table. Causality is by absolute position: a query at position p sees the keys at
positions <= p. A query that sees no key in a row gets `out = 0`, `lse = -inf`, so it drops out of
the merge. Merging the partials of every segment of a sequence gives ordinary causal attention.

GQA is computed without expanding KV heads: query head h uses KV head h // group, where
group = num_heads / num_kv_heads, as in Hugging Face's `repeat_kv`.

Everything about a batch except the K/V values is the same in every layer (which blocks to gather,
which keys each query sees), so it is worked out once per batch (`_KeyLayout`) and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from infinite_llm.kvcache.paged import PagedBatch


@dataclass(slots=True)
class _KeyLayout:
    """Layer-invariant part of attending a group of rows in one call, each row's queries padded
    to the group's longest run (a row's last query repeated): what to gather, what each query
    sees, and where the results go."""

    blocks: Tensor  # [R * num_blocks] int64, the rows' block tables, flattened
    mask: Tensor  # [R, 1, group * Q, L] float32: 0 where the query sees the key, else -inf
    blind: Tensor | None  # [R, 1, group * Q] bool, queries that see no key; None if none do
    num_q: int  # Q: queries per row after padding
    queries: Tensor | None  # [R * Q] int64, the token of each padded query; None if every
    #                         token in order (R * Q == num_tokens)
    results: Tensor | None  # [n] int64, the padded query of each of the group's n tokens;
    #                         None if no row is padded (n == R * Q)
    tokens: Tensor | None  # [n] int64, the group's tokens in the step; None if all, in order


def store_kv(
    k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slots: Tensor,  # [num_tokens] int64, block * block_size + offset
    k: Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: Tensor,  # [num_tokens, num_kv_heads, head_dim]
) -> None:
    """Write new keys and values into their slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    batch: PagedBatch,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Partial attention of every row; returns out [num_tokens, num_heads, head_dim] (q's dtype)
    and lse [num_tokens, num_heads] (float32).

    Rows are attended in groups of similar query counts (`_groups`), one call per group: a
    decode step's rows are one group, and so are a batch of prompts of similar lengths, where a
    call per row would cost a kernel launch (on a busy CPU, a wait for every thread) per row and
    layer.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_tokens == 0:
        return q.new_zeros(q.shape), q.new_zeros((0, num_heads), dtype=torch.float32)
    if batch.layouts is None:
        batch.layouts = [_key_layout(batch, rows, group, k_cache.shape[1])
                         for rows in _groups(batch.q_lens)]
    if len(batch.layouts) == 1 and batch.layouts[0].tokens is None:  # every token, in order
        return _attend_rows(q, k_cache, v_cache, batch.layouts[0], scale)
    out = q.new_zeros(num_tokens, num_heads, head_dim)
    lse = q.new_full((num_tokens, num_heads), float("-inf"), dtype=torch.float32)
    for layout in batch.layouts:
        o, s = _attend_rows(q, k_cache, v_cache, layout, scale)
        out.index_copy_(0, layout.tokens, o)
        lse.index_copy_(0, layout.tokens, s)
    return out, lse


def _attend_rows(
    q: Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    layout: _KeyLayout,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """One group's attention in one call: out [n, num_heads, head_dim] (q's dtype) and lse
    [n, num_heads] of the group's n tokens, in the group's order."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    rows, num_q = layout.mask.shape[0], layout.num_q
    qg = q if layout.queries is None else q.index_select(0, layout.queries)
    # [R * Q, heads, d] -> [R, kv_heads, group * Q, d]: query g * Q + i of a row is query head g
    # (of its KV head) of the row's i-th query.
    qg = qg.view(rows, num_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    out, lse = _attend(qg.reshape(rows, num_kv_heads, group * num_q, head_dim), k_cache,
                       v_cache, layout, scale)
    out = out.view(rows, num_kv_heads, group, num_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(rows * num_q, num_heads, head_dim)
    lse = lse.view(rows, num_kv_heads, group, num_q).permute(0, 3, 1, 2).reshape(-1, num_heads)
    if layout.results is not None:
        out, lse = out.index_select(0, layout.results), lse.index_select(0, layout.results)
    return out.to(q.dtype), lse


def _groups(q_lens: list[int]) -> list[list[int]]:
    """Rows with queries, grouped by the power of two their query count rounds up to: padding
    a row to its group's longest costs at most twice its queries, and a step of decodes or of
    similar prompts is one group."""
    groups: dict[int, list[int]] = {}
    for row, n in enumerate(q_lens):
        if n:
            groups.setdefault((n - 1).bit_length(), []).append(row)
    return list(groups.values())


def _key_layout(batch: PagedBatch, rows: list[int], group: int, block_size: int) -> _KeyLayout:
    """The `_KeyLayout` of `rows`, their queries padded to the longest row's and their keys to
    the longest row's whole blocks."""
    device = batch.q_positions.device
    q_lens = [batch.q_lens[r] for r in rows]
    starts = list(accumulate(batch.q_lens, initial=0))
    num_q = max(q_lens)
    queries = [starts[r] + min(i, n - 1) for r, n in zip(rows, q_lens) for i in range(num_q)]
    results = [j * num_q + i for j, n in enumerate(q_lens) for i in range(n)]
    tokens = [starts[r] + i for r, n in zip(rows, q_lens) for i in range(n)]
    every = len(tokens) == len(batch.q_positions)  # then `tokens` is 0..num_tokens-1
    rows_t = torch.tensor(rows, device=device)
    queries_t = torch.tensor(queries, device=device)
    q_pos = batch.q_positions[queries_t].view(len(rows), num_q)  # [R, Q]
    kv_starts, kv_lens = batch.kv_starts[rows_t], batch.kv_lens[rows_t]
    num_blocks = max(1, -(-max(batch.kv_lens_host[r] for r in rows) // block_size))
    offsets = torch.arange(num_blocks * block_size, device=device)
    k_pos = kv_starts[:, None] + offsets  # [R, L]
    k_valid = offsets < kv_lens[:, None]  # [R, L]
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [R, Q, L]
    visible = visible[:, None].expand(-1, group, -1, -1).reshape(len(rows), 1, group * num_q, -1)
    mask = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
    blind = ~visible.any(dim=-1)
    return _KeyLayout(
        blocks=batch.block_tables[rows_t, :num_blocks].reshape(-1).long(),
        mask=mask,
        blind=blind if bool(blind.any()) else None,
        num_q=num_q,
        queries=None if queries == list(range(len(batch.q_positions))) else queries_t,
        results=None if results == list(range(len(queries))) else torch.tensor(
            results, device=device),
        tokens=None if every else torch.tensor(tokens, device=device),
    )


# ATen's fused CPU attention (the kernel behind SDPA on CPU), which also returns the LSE.
_flash_attention_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _attend(
    q: Tensor,  # [R, kv_heads, group * Q, d]
    k_cache: Tensor,  # [num_blocks, block_size, kv_heads, d]
    v_cache: Tensor,  # [num_blocks, block_size, kv_heads, d]
    layout: _KeyLayout,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention in float32 over the layout's gathered keys, one (row, KV head)
    at a time. Returns out [R, kv_heads, group * Q, d] and lse [R, kv_heads, group * Q].

    On CPU, ATen's fused kernel: it reads each key once for all of a row's queries and launches
    one parallel loop, where the same math in separate ops costs a dozen passes and loops a
    layer (each of which, on a busy CPU, can wait a scheduler time slice). Elsewhere (this
    reference on GPU, in tests) the same math spelled out.
    """
    num_rows, kv_heads = q.shape[:2]
    shape = (num_rows, -1, kv_heads, k_cache.shape[-1])  # [R, L, kv_heads, d]
    keys = k_cache.index_select(0, layout.blocks).view(shape).transpose(1, 2).float()
    values = v_cache.index_select(0, layout.blocks).view(shape).transpose(1, 2).float()
    qf = q.float()
    attend = _flash_attention_cpu if qf.device.type == "cpu" else _softmax_attention
    out, lse = attend(qf, keys, values, attn_mask=layout.mask, scale=scale)
    if layout.blind is not None:  # the fused kernel gives such queries out = 0 but lse = 0
        lse = lse.masked_fill(layout.blind, float("-inf"))
    return out, lse


def _softmax_attention(
    q: Tensor,  # [R, heads, Q, d]
    k: Tensor,  # [R, heads, L, d]
    v: Tensor,  # [R, heads, L, d]
    *,
    attn_mask: Tensor,  # broadcasts to [R, heads, Q, L], additive
    scale: float,
) -> tuple[Tensor, Tensor]:
    """What the fused CPU kernel computes, spelled out: out [R, heads, Q, d] and lse
    [R, heads, Q]; a query that sees no key gets out = 0 and lse = -inf."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + attn_mask
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(probs, v), lse


def merge(
    outs: Tensor,  # [num_partials, num_tokens, num_heads, head_dim]
    lses: Tensor,  # [num_partials, num_tokens, num_heads] float32
) -> tuple[Tensor, Tensor]:
    """Exact merge of partials over disjoint KV.

    lse = logsumexp_j lse_j and out = sum_j exp(lse_j - lse) * o_j; a partial with lse = -inf
    (no visible key) gets weight 0.
    """
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - torch.where(torch.isinf(lse), 0.0, lse))
    out = (weights[..., None] * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse
