"""Partial attention over paged KV returning `(out, lse)`, and the exact LSE merge (pure torch).

This is the CPU path and the definition the GPU kernels are tested against. A *row* of a
`PagedBatch` is one sequence's queries attending to one contiguous run of KV (a segment) that lives
in this pool: keys at absolute positions `kv_start .. kv_start + kv_len - 1`, stored in the blocks
of the row's block table. Causality is by absolute position: a query at position p sees the keys at
positions <= p. A query that sees no key in a row gets `out = 0`, `lse = -inf`, so it drops out of
the merge. Merging the partials of every segment of a sequence gives ordinary causal attention.

GQA is computed without expanding KV heads: query head h uses KV head h // group, where
group = num_heads / num_kv_heads, as in Hugging Face's `repeat_kv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
        # Decode: one query per row, every row in one padded batched computation.
        keys, values, k_pos, k_valid = _gather_rows(k_cache, v_cache, batch, range(num_tokens))
        qg = q.view(num_tokens, num_kv_heads, group, 1, head_dim)
        out, lse = _attend(qg, keys, values, batch.q_positions[:, None], k_pos, k_valid, scale)
        out = out.view(num_tokens, num_heads, head_dim).to(q.dtype)
        return out, lse.view(num_tokens, num_heads)
    out = q.new_zeros(num_tokens, num_heads, head_dim)
    lse = q.new_full((num_tokens, num_heads), float("-inf"), dtype=torch.float32)
    start = 0
    for row, q_len in enumerate(batch.q_lens):
        # Prefill chunks: one row at a time, so no padding to the longest query run.
        end = start + q_len
        if q_len and batch.kv_lens_host[row]:
            keys, values, k_pos, k_valid = _gather_rows(k_cache, v_cache, batch, [row])
            qg = q[start:end].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
            o, s = _attend(qg[None], keys, values, batch.q_positions[None, start:end], k_pos,
                           k_valid, scale)
            out[start:end] = o[0].permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
            lse[start:end] = s[0].permute(2, 0, 1).reshape(q_len, num_heads)
        start = end
    return out, lse


def _gather_rows(
    k_cache: Tensor, v_cache: Tensor, batch: PagedBatch, rows: range | list[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keys/values of the given rows as [rows, kv_heads, L, d], their positions and validity.

    `index_select` rather than advanced indexing: on a busy CPU the latter's parallel loop can
    wait a scheduler time slice for each call, even for a few blocks.
    """
    num_blocks = max(1, -(-max(batch.kv_lens_host[r] for r in rows) // k_cache.shape[1]))
    rows = list(rows)
    table = batch.block_tables[rows, :num_blocks].reshape(-1).long()
    n, length = len(rows), num_blocks * k_cache.shape[1]
    keys = k_cache.index_select(0, table).view(n, length, *k_cache.shape[2:]).transpose(1, 2)
    values = v_cache.index_select(0, table).view(n, length, *v_cache.shape[2:]).transpose(1, 2)
    offsets = torch.arange(length, device=k_cache.device)
    k_pos = batch.kv_starts[rows, None] + offsets
    k_valid = offsets < batch.kv_lens[rows, None]
    return keys, values, k_pos, k_valid


def _attend(
    q: Tensor,  # [B, kv_heads, group, Q, d]
    k: Tensor,  # [B, kv_heads, L, d]
    v: Tensor,  # [B, kv_heads, L, d]
    q_pos: Tensor,  # [B, Q]
    k_pos: Tensor,  # [B, L]
    k_valid: Tensor,  # [B, L]
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Masked softmax attention in float32, one bmm per product over (row, kv head).

    Returns out [B, kv_heads, group, Q, d] and lse [B, kv_heads, group, Q].
    """
    b, kv_heads, group, num_q, dim = q.shape
    length = k.shape[2]
    qf, kf, vf = q.float(), k.float(), v.float()
    if num_q == 1:
        # Decode: elementwise products and sums. CPU bmm splits even tiny batches over threads,
        # and on a busy CPU each such split can wait a whole scheduler time slice.
        scores = (qf * kf[:, :, None]).sum(-1, keepdim=True).transpose(-1, -2)
    else:
        scores = torch.bmm(qf.reshape(b * kv_heads, group * num_q, dim),
                           kf.reshape(b * kv_heads, length, dim).transpose(1, 2))
    scores = scores.view(b, kv_heads, group, num_q, length) * scale
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]  # [B, Q, L]
    scores.masked_fill_(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    if num_q == 1:
        out = (probs.transpose(-1, -2) * vf[:, :, None]).sum(-2, keepdim=True)
    else:
        out = torch.bmm(probs.view(b * kv_heads, group * num_q, length),
                        vf.reshape(b * kv_heads, length, dim))
    return out.view(b, kv_heads, group, num_q, dim), lse


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
