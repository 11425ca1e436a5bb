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

from dataclasses import dataclass, field

import torch
from torch import Tensor

_DECODE = "decode"  # `PagedBatch.layouts` key of the batched one-query-per-row layout


@dataclass(slots=True)
class _KeyLayout:
    """Layer-invariant part of attending some rows: what to gather and what each query sees."""

    blocks: Tensor  # [R * num_blocks] int64, the rows' block tables, flattened
    mask: Tensor  # [R, 1, group * Q, L] float32: 0 where the query sees the key, else -inf
    blind: Tensor | None  # [R, 1, group * Q] bool, queries that see no key; None if none do


@dataclass(slots=True)
class PagedBatch:
    """Which KV each query attends to in one pool; see the module docstring."""

    cu_q_lens: Tensor  # [num_rows + 1] int64: queries of row i are q[cu_q_lens[i]:cu_q_lens[i+1]]
    q_positions: Tensor  # [num_tokens] int64, absolute positions
    block_tables: Tensor  # [num_rows, max_blocks] int32, padded with 0
    kv_starts: Tensor  # [num_rows] int64, absolute position of the row's first key
    kv_lens: Tensor  # [num_rows] int64, number of keys in the row
    q_lens: list[int]  # host copy of cu_q_lens' differences, for Python-side control flow
    kv_lens_host: list[int]  # host copy of kv_lens
    # Built by `paged_attention` on first use and reused by later layers; the fields above must
    # not change once a layout exists (build a new batch instead).
    layouts: dict[str | int, _KeyLayout] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return len(self.q_lens)


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
    and lse [num_tokens, num_heads] (float32)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_tokens == 0:
        return q.new_zeros(q.shape), q.new_zeros((0, num_heads), dtype=torch.float32)
    if batch.num_rows == num_tokens and all(n == 1 for n in batch.q_lens):
        # Decode: one query per row, every row in one padded batched computation; a row's
        # `group` query heads that share a KV head are its queries there.
        layout = batch.layouts.get(_DECODE)
        if layout is None:
            layout = batch.layouts[_DECODE] = _key_layout(
                batch, slice(0, num_tokens), batch.q_positions[:, None], group, k_cache.shape[1])
        qg = q.view(num_tokens, num_kv_heads, group, head_dim)
        out, lse = _attend(qg, k_cache, v_cache, layout, scale)
        return (out.reshape(num_tokens, num_heads, head_dim).to(q.dtype),
                lse.reshape(num_tokens, num_heads))
    out = q.new_zeros(num_tokens, num_heads, head_dim)
    lse = q.new_full((num_tokens, num_heads), float("-inf"), dtype=torch.float32)
    start = 0
    for row, q_len in enumerate(batch.q_lens):
        # Prefill chunks: one row at a time, so no padding to the longest query run.
        end = start + q_len
        if q_len and batch.kv_lens_host[row]:
            layout = batch.layouts.get(row)
            if layout is None:
                layout = batch.layouts[row] = _key_layout(
                    batch, slice(row, row + 1), batch.q_positions[None, start:end], group,
                    k_cache.shape[1])
            qg = q[start:end].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
            o, s = _attend(qg.reshape(1, num_kv_heads, group * q_len, head_dim), k_cache,
                           v_cache, layout, scale)
            o = o.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
            out[start:end] = o.reshape(q_len, num_heads, head_dim)
            lse[start:end] = s.view(num_kv_heads, group, q_len).permute(2, 0, 1).reshape(
                q_len, num_heads)
        start = end
    return out, lse


def _key_layout(
    batch: PagedBatch,
    rows: slice,
    q_pos: Tensor,  # [R, Q] absolute positions of each row's queries
    group: int,
    block_size: int,
) -> _KeyLayout:
    """The `_KeyLayout` of `rows`, their keys padded to the longest row's whole blocks; query
    index g * Q + i of a row is query head g of its i-th query (see `_attend`)."""
    num_rows, num_q = q_pos.shape
    num_blocks = max(1, -(-max(batch.kv_lens_host[rows]) // block_size))
    offsets = torch.arange(num_blocks * block_size, device=q_pos.device)
    k_pos = batch.kv_starts[rows, None] + offsets  # [R, L]
    k_valid = offsets < batch.kv_lens[rows, None]  # [R, L]
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [R, Q, L]
    visible = visible[:, None].expand(-1, group, -1, -1).reshape(num_rows, 1, group * num_q, -1)
    mask = torch.zeros(visible.shape, device=q_pos.device).masked_fill_(~visible, float("-inf"))
    blind = ~visible.any(dim=-1)
    return _KeyLayout(
        blocks=batch.block_tables[rows, :num_blocks].reshape(-1).long(),
        mask=mask,
        blind=blind if bool(blind.any()) else None,
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
