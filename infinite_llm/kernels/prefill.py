"""Paged prefill partial attention: rows with any number of queries (chunked prefill, remote
segments, decodes mixed in), causal by absolute position.

Grid (query tile, kv_head). A tile is BLOCK_M rows of the dots = TOKENS queries of one row x the
GQA group's heads (padded to G_PAD), so every KV tile is read once for the group. Tiles never
straddle rows; a program finds its row by binary search over `cu_tiles`. Keys every query of the
tile sees (those at or before the earliest query position) run without masks; the rest, up to the
latest query position, with the causal and length masks. A segment wholly before the queries
(a remote segment) is thus all unmasked; one wholly after them is skipped (out 0, lse -inf).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

from infinite_llm.kernels.common import (
    LOG2E,
    dot_precision,
    finish,
    load_kv_tile,
    next_pow2,
    softmax_step,
)

if TYPE_CHECKING:  # a type only: the kernels import nothing from the layers above them
    from infinite_llm.kvcache.paged import PagedBatch


@triton.jit
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    table_ptr,  # [num_rows, max_blocks] int32
    kv_starts_ptr,  # [num_rows] int64
    kv_lens_ptr,  # [num_rows] int64
    q_pos_ptr,  # [num_tokens] int64
    cu_q_ptr,  # [num_rows + 1] int64
    cu_tiles_ptr,  # [num_rows + 1] int64: index of each row's first query tile
    o_ptr,  # [num_tokens, num_heads, head_dim]
    lse_ptr,  # [num_tokens, num_heads] float32
    qk_scale,  # softmax scale * log2(e)
    num_rows,
    search_steps,  # bit length of num_rows
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_table,
    stride_ot, stride_oh,
    stride_lt,
    GROUP: tl.constexpr,  # query heads per kv head
    G_PAD: tl.constexpr,  # GROUP padded to a power of two
    BLOCK_M: tl.constexpr,  # (queries per tile) * G_PAD
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per tile
    PAGE: tl.constexpr,  # tokens per cache block
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    # Binary search for the last row whose first tile is <= tile (rows without queries own no
    # tile). lo/hi start as tensors (tile * 0) because loop-carried values can't be constexprs.
    lo = tile * 0
    hi = lo + num_rows - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        go = tl.load(cu_tiles_ptr + mid) <= tile
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    row = lo
    q_begin = tl.load(cu_q_ptr + row)
    q_len = (tl.load(cu_q_ptr + row + 1) - q_begin).to(tl.int32)
    first = (tile - tl.load(cu_tiles_ptr + row)).to(tl.int32) * (BLOCK_M // G_PAD)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok_q = first + offs_m // G_PAD
    head_in_group = offs_m % G_PAD
    m_valid = (tok_q < q_len) & (head_in_group < GROUP)
    t = q_begin + tok_q
    heads = kvh * GROUP + head_in_group
    qo_mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + t[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=qo_mask, other=0.0).to(k_ptr.dtype.element_ty)
    kv_start = tl.load(kv_starts_ptr + row)
    kv_len = tl.load(kv_lens_ptr + row)
    pos = tl.load(q_pos_ptr + t, mask=m_valid, other=0)
    # Query m sees keys j <= rel[m] (causal, and j < kv_len); padding rows see none.
    rel = tl.where(m_valid, tl.minimum(tl.maximum(pos - kv_start, -1), kv_len - 1), -1)
    rel = rel.to(tl.int32)
    n_hi = tl.max(rel, 0) + 1
    n_all = tl.min(tl.where(m_valid, rel, n_hi), 0) + 1
    full_hi = n_all // BLOCK_N * BLOCK_N

    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    table = table_ptr + row * stride_table
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, full_hi, BLOCK_N):  # keys every query of the tile sees
        tok = start + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(k_base, v_base, table, tok, tok < n_hi, offs_d, stride_kb,
                            stride_kt, stride_vb, stride_vt, PAGE, HEAD_DIM, BLOCK_D, False)
        m_i, l_i, acc = softmax_step(q, k, v, 0, m_i, l_i, acc, qk_scale, False, PRECISION)
    for start in range(full_hi, n_hi, BLOCK_N):  # the causal diagonal and the row's end
        tok = start + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(k_base, v_base, table, tok, tok < n_hi, offs_d, stride_kb,
                            stride_kt, stride_vb, stride_vt, PAGE, HEAD_DIM, BLOCK_D, True)
        visible = tok[None, :] <= rel[:, None]
        m_i, l_i, acc = softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, True, PRECISION)
    out, lse = finish(m_i, l_i, acc)
    tl.store(o_ptr + t[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=qo_mask)
    tl.store(lse_ptr + t * stride_lt + heads, lse, mask=m_valid)


def _config(head_dim: int, dtype_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Head dim 128 in 16 bits: the best of 36 on an
    H100 (`benchmarks/attention_kernels.py --prefill-sweep`: 407 and 398 TFLOP/s on a 16K prompt
    and a 64K prompt's last 8K chunk, the best 128 x 64 tiles 371 and 369); the others,
    FlashAttention-2's usual shapes."""
    if dtype_size == 4 or head_dim > 128:
        return 64, 32, 4, 2
    return (128, 128, 8, 3) if head_dim > 64 else (128, 64, 4, 3)


def prefill_attention(
    q: Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    batch: PagedBatch,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Partial attention of rows with any q_len; same contract as `reference.paged_attention`."""
    num_tokens, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    g_pad = next_pow2(group)
    block_m, block_n, num_warps, num_stages = _config(head_dim, k_cache.element_size())
    block_m = max(block_m, g_pad)
    tokens = block_m // g_pad
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.full((num_tokens, num_heads), float("-inf"), device=q.device)
    num_tiles = sum(-(-n // tokens) for n in batch.q_lens)
    if num_tiles == 0:
        return out, lse
    tiles = (batch.cu_q_lens.diff() + tokens - 1) // tokens
    cu_tiles = torch.nn.functional.pad(tiles.cumsum(0), (1, 0))
    _prefill_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, batch.block_tables, batch.kv_starts, batch.kv_lens,
        batch.q_positions, batch.cu_q_lens, cu_tiles, out, lse, scale * LOG2E,
        batch.num_rows, batch.num_rows.bit_length(),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        batch.block_tables.stride(0), out.stride(0), out.stride(1), lse.stride(0),
        GROUP=group, G_PAD=g_pad, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_D=max(16, next_pow2(head_dim)), BLOCK_N=block_n, PAGE=page,
        PRECISION=dot_precision(k_cache.element_size()),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
