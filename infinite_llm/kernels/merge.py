"""Exact LSE merge of partial attentions over disjoint KV: the owner's step of DistAttention and
the last step of split-K decode.

lse = logsumexp_j lse_j, out = sum_j exp(lse_j - lse) * o_j, computed in fp32 against a running
max so nothing overflows; a partial with lse = -inf has weight 0, and a query that no partial saw
gets out = 0, lse = -inf, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infinite_llm.kernels.common import next_pow2, pdl_args, release_dependents


@triton.jit
def merge_splits(
    o_part_ptr,  # [num_splits, split_stride, HEAD_DIM]
    lse_part_ptr,  # [num_splits, split_stride] float32
    out_ptr,  # [split_stride, HEAD_DIM]
    lse_ptr,  # [split_stride] float32
    first,  # index of the first of the GROUP merged rows within split_stride
    num_splits,
    split_stride,  # rows per partial (num_tokens * num_heads)
    GROUP: tl.constexpr,  # consecutive rows merged together (a GQA group, or 1)
    G_PAD: tl.constexpr,  # GROUP padded to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,  # partials per step
):
    """Merge GROUP rows over all partials, BLOCK_S partials at a time (online, like softmax).

    Small steps, pipelined 3 deep, keep few registers per thread."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    rows = first + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for s0 in tl.range(0, num_splits, BLOCK_S, num_stages=4):
        s = s0 + offs_s
        idx = s[:, None].to(tl.int64) * split_stride + rows[None, :]  # [BLOCK_S, G_PAD]
        mask = (s < num_splits)[:, None] & g_mask[None, :]
        lse = tl.load(lse_part_ptr + idx, mask=mask, other=float("-inf"))
        o = tl.load(o_part_ptr + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=mask[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(lse - m_safe[None, :])  # 0 for lse = -inf
        alpha = tl.exp(m - m_safe)
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
        m = m_new
    seen = total > 0
    t_one = tl.where(seen, total, 1.0)
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / t_one[:, None]).to(out_ptr.dtype.element_ty),
             mask=g_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + rows, tl.where(seen, m + tl.log(t_one), float("-inf")), mask=g_mask)


@triton.jit
def _merge_kernel(
    o_ptr,  # [num_partials, num_tokens, num_heads, HEAD_DIM], contiguous
    l_ptr,  # [num_partials, num_tokens, num_heads] float32, contiguous
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    lse_ptr,  # [num_tokens, num_heads] float32
    num_partials,
    rows,  # num_tokens * num_heads
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    release_dependents(PDL)
    merge_splits(o_ptr, l_ptr, out_ptr, lse_ptr, tl.program_id(0), num_partials, rows,
                 1, 1, HEAD_DIM, BLOCK_D, BLOCK_S)


def merge_into(
    outs: Tensor,  # [num_partials, num_tokens, num_heads, head_dim]
    lses: Tensor,  # [num_partials, num_tokens, num_heads] float32
    out: Tensor,  # [num_tokens, num_heads, head_dim], contiguous, any float dtype; written
    lse: Tensor,  # [num_tokens, num_heads] float32, contiguous; written
) -> None:
    """Merge into given tensors, so split-K decode writes its q-dtype output in this one pass."""
    num_partials, num_tokens, num_heads, head_dim = outs.shape
    if num_tokens * num_heads == 0:
        return
    block_d = next_pow2(head_dim)
    _merge_kernel[(num_tokens * num_heads,)](
        outs.contiguous(), lses.float().contiguous(), out, lse, num_partials,
        num_tokens * num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_S=min(next_pow2(num_partials), max(1, 2048 // block_d)), **pdl_args(out.device),
    )


def merge(
    outs: Tensor,  # [num_partials, num_tokens, num_heads, head_dim]
    lses: Tensor,  # [num_partials, num_tokens, num_heads] float32
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.merge`: (out in outs' dtype, lse float32)."""
    _, num_tokens, num_heads, head_dim = outs.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=outs.dtype, device=outs.device)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=outs.device)
    merge_into(outs, lses, out, lse)
    return out, lse
