"""Paged decode attention with split-K (flash-decoding): one query per row.

Grid (row, kv_head, split). A program holds the queries of one GQA group as the M dimension of
its dots (padded to 16, the smallest tl.dot), so each KV tile is read from memory once for the
whole group, and walks the keys of its split with an online softmax. Decode is bound by reading
the KV cache, so the number of splits is chosen to fill the GPU's resident program slots (SMs x
programs per SM, read off the compiled kernel) in one round: with uniform work a grid of 1.3
rounds runs nearly as long as 2. One split when rows x kv_heads already keep the memory busy,
more for long contexts of a few rows. Splits write fp32 partials that `merge_into` reduces
exactly; with one split the kernel writes the final output directly. (Merging inside the kernel,
by the last split to finish, measured slower on an H100, down to half the bandwidth at 4K x 1:
the merges then run after the wave, one program per GQA group;
`python benchmarks/attention_kernels.py`.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
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
    pdl_args,
    release_dependents,
    softmax_step,
)
from infinite_llm.kernels.merge import merge_into

if TYPE_CHECKING:  # a type only: the kernels import nothing from the layers above them
    from infinite_llm.kvcache.paged import PagedBatch


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Tile and launch shape; `splits` fixes the split count (tests, tuning) instead of the
    occupancy rule of `num_splits`. No split gets fewer than `min_split_tokens` keys.

    `split_per_row` (needs `splits`): every row divides its own keys evenly over the splits, so
    the launch depends on nothing but the number of rows: what a CUDA graph replays over steps
    whose lengths change."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    min_split_tokens: int = 64
    splits: int | None = None
    split_per_row: bool = False


# Resident programs per SM of each compiled specialization, learned at its first launch.
_PROGRAMS_PER_SM: dict[tuple, int] = {}


@triton.jit
def _decode_kernel(
    q_ptr,  # [num_rows, num_heads, HEAD_DIM], contiguous in heads and HEAD_DIM
    k_ptr,  # [num_blocks, PAGE, NUM_KV_HEADS, HEAD_DIM], contiguous in HEAD_DIM
    v_ptr,  # [num_blocks, PAGE, NUM_KV_HEADS, HEAD_DIM], contiguous in HEAD_DIM
    table_ptr,  # [num_rows, stride_table] int32
    kv_starts_ptr,  # [num_rows] int64
    kv_lens_ptr,  # [num_rows] int64
    q_pos_ptr,  # [num_rows] int64
    out_ptr,  # [num_rows, num_heads, HEAD_DIM]
    lse_ptr,  # [num_rows, num_heads] float32
    o_part_ptr,  # [num_splits, num_rows, num_heads, HEAD_DIM] float32 (unused with one split)
    lse_part_ptr,  # [num_splits, num_rows, num_heads] float32 (unused with one split)
    qk_scale,  # softmax scale * log2(e)
    num_rows,
    stride_q,  # between rows of q (a view of a fused QKV has gaps between them)
    stride_table,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    tokens_per_split,  # multiple of BLOCK_N; 0: each row splits its own keys evenly
    num_splits,
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_H: tl.constexpr,  # GROUP padded to a power of two >= 16 (the smallest tl.dot)
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per tile
    PAGE: tl.constexpr,  # tokens per cache block
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    release_dependents(PDL)
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    kv_start = tl.load(kv_starts_ptr + row)
    kv_len = tl.load(kv_lens_ptr + row)
    pos = tl.load(q_pos_ptr + row)
    # Keys kv_start + j with j < kv_len and kv_start + j <= pos are visible: a prefix of the row.
    n = tl.maximum(tl.minimum(kv_len, pos - kv_start + 1), 0).to(tl.int32)
    per_split = tl.where(tokens_per_split > 0, tokens_per_split,
                         tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n)
    full_hi = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N

    num_heads: tl.constexpr = NUM_KV_HEADS * GROUP
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    row_heads = row * num_heads + kvh * GROUP + offs_h  # [BLOCK_H] index into [rows, heads]
    h_mask = offs_h < GROUP
    qo_mask = h_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_heads = row * stride_q + (kvh * GROUP + offs_h) * HEAD_DIM
    q = tl.load(q_ptr + q_heads[:, None] + offs_d[None, :], mask=qo_mask,
                other=0.0).to(k_ptr.dtype.element_ty)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    table = table_ptr + row * stride_table

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, full_hi, BLOCK_N):  # whole tiles: no masks
        tok = start + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(k_base, v_base, table, tok, tok < hi, offs_d, stride_kb,
                            stride_kt, stride_vb, stride_vt, PAGE, HEAD_DIM, BLOCK_D, False)
        m_i, l_i, acc = softmax_step(q, k, v, 0, m_i, l_i, acc, qk_scale, False, PRECISION)
    for start in range(full_hi, hi, BLOCK_N):  # the last, partial tile
        tok = start + tl.arange(0, BLOCK_N)
        valid = tok < hi
        k, v = load_kv_tile(k_base, v_base, table, tok, valid, offs_d, stride_kb,
                            stride_kt, stride_vb, stride_vt, PAGE, HEAD_DIM, BLOCK_D, True)
        m_i, l_i, acc = softmax_step(q, k, v, valid[None, :], m_i, l_i, acc, qk_scale, True,
                                     PRECISION)
    out, lse = finish(m_i, l_i, acc)
    if num_splits == 1:
        tl.store(out_ptr + row_heads[:, None] * HEAD_DIM + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qo_mask)
        tl.store(lse_ptr + row_heads, lse, mask=h_mask)
    else:
        part = split.to(tl.int64) * num_rows * num_heads + row_heads
        tl.store(o_part_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=qo_mask)
        tl.store(lse_part_ptr + part, lse, mask=h_mask)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter on CPU: small, so tests still exercise splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs_per_sm(kernel: object, device: torch.device) -> int:
    """Resident programs per SM of a compiled kernel, from its registers and shared memory
    (what the CUDA occupancy calculator does); 2 where that can't be read (interpreter)."""
    n_regs, metadata = getattr(kernel, "n_regs", None), getattr(kernel, "metadata", None)
    if device.type != "cuda" or not n_regs or metadata is None:
        return 2
    props = torch.cuda.get_device_properties(device)
    warps = metadata.num_warps
    regs_per_warp = -(-n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    by_smem = smem // (metadata.shared + 1024)  # 1 KB per block is reserved
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    return max(1, min(by_regs, by_smem, by_threads))


def split_tokens(max_kv: int, splits: int, block_n: int) -> int:
    """Keys per split: whole tiles, so only a row's last tile needs masks."""
    return -(-max(max_kv, 1) // (splits * block_n)) * block_n


def num_splits(programs: int, max_kv: int, slots: int, config: DecodeConfig) -> int:
    """Splits per (row, kv head). Reading the cache at full bandwidth takes about half the GPU's
    resident program slots busy; a second, partial round of programs would run nearly as long as
    a full one. So: one split when rows x kv_heads fill half the slots, else as many as fit in
    one round."""
    max_splits = max(1, -(-max_kv // config.min_split_tokens))
    if config.splits is not None:
        return max(1, min(config.splits, max_splits))
    if 2 * programs >= slots:
        return 1
    return max(1, min(max_splits, slots // programs))


def _kernel_key(q: Tensor, k_cache: Tensor, config: DecodeConfig) -> tuple:
    """What the compiled kernel's occupancy depends on."""
    return (q.device, k_cache.dtype, q.dtype, q.shape[1] // k_cache.shape[2], q.shape[2],
            k_cache.shape[1], config)


def default_config(k_cache: Tensor, num_rows: int) -> DecodeConfig:
    """Key tiles of 64, 32 for fp32 caches (twice the bytes per key). 4 pipeline stages where
    rows x kv_heads programs fill every SM 8 times or more: there more bytes in flight per
    program beat more resident programs (H100 sweeps at 1K x 256, `attention_kernels.py
    --sweep`: 2907 against 2813 GB/s, 2906 against 2864; at 1K x 64, 512 programs, 4 stages
    were 0.99x)."""
    config = DecodeConfig(block_n=32) if k_cache.element_size() == 4 else DecodeConfig()
    if num_rows * k_cache.shape[2] >= 8 * _sm_count(k_cache.device):
        config = replace(config, num_stages=4)
    return config


def long_tiles(config: DecodeConfig, k_cache: Tensor, num_rows: int,
               keys_per_split: int) -> DecodeConfig:
    """`config` with key tiles of 128 where rows x kv_heads programs can't fill the GPU (the
    keys are split) and each split has 512 keys or more, so each program streams longer runs
    between its fixed costs; else `config`. 16-bit caches only. An H100 sweep
    (`benchmarks/attention_kernels.py --sweep`) measured 128 best at 16K-128K x 1, 4K x 8,
    1K x 16 and 8K x 16, and 64 at 1K x 1 (16 splits of 64 keys), 4K x 1, 1K x 64 and 1K x 256."""
    if (k_cache.element_size() == 2 and keys_per_split >= 512
            and num_rows * k_cache.shape[2] <= 2 * _sm_count(k_cache.device)):
        return replace(config, block_n=128)
    return config


def choose_splits(num_rows: int, q: Tensor, k_cache: Tensor, max_kv: int,
                  config: DecodeConfig) -> int:
    """`num_splits` for this launch, with the resident-program count learned for its kernel."""
    slots = _sm_count(q.device) * _PROGRAMS_PER_SM.get(_kernel_key(q, k_cache, config), 2)
    return num_splits(num_rows * k_cache.shape[2], max_kv, slots, config)


def decode_attention(
    q: Tensor,  # [num_rows, num_heads, head_dim]: one query per row
    k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous in head_dim
    v_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous in head_dim
    batch: PagedBatch,
    scale: float,
    config: DecodeConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode partial attention; same contract as `reference.paged_attention`."""
    num_rows, num_heads, head_dim = q.shape
    _, page, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    chosen = config is None  # the tiles follow the split count
    if config is None:
        config = default_config(k_cache, num_rows)
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    out = torch.empty(num_rows, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_rows, num_heads, dtype=torch.float32, device=q.device)
    if num_rows == 0:
        return out, lse
    if config.split_per_row:
        if config.splits is None:
            raise ValueError("split_per_row needs a fixed number of splits")
        splits, per_split = config.splits, 0
    else:
        max_kv = max(batch.kv_lens_host)
        splits = choose_splits(num_rows, q, k_cache, max_kv, config)
        if chosen:
            config = long_tiles(config, k_cache, num_rows, max_kv // splits)
        per_split = split_tokens(max_kv, splits, config.block_n)
        splits = max(1, -(-max_kv // per_split))
    key = _kernel_key(q, k_cache, config)
    if splits == 1:
        o_part, lse_part = out, lse  # placeholders, never touched
    else:
        o_part = q.new_empty(splits, num_rows, num_heads, head_dim, dtype=torch.float32)
        lse_part = q.new_empty(splits, num_rows, num_heads, dtype=torch.float32)
    kernel = _decode_kernel[(num_rows, num_kv_heads, splits)](
        q, k_cache, v_cache, batch.block_tables, batch.kv_starts, batch.kv_lens,
        batch.q_positions, out, lse, o_part, lse_part, scale * LOG2E, num_rows, q.stride(0),
        batch.block_tables.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], per_split,
        splits,
        GROUP=group, BLOCK_H=max(16, next_pow2(group)), NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)), BLOCK_N=config.block_n,
        PAGE=page, PRECISION=dot_precision(k_cache.element_size()),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_args(q.device),
    )
    if splits > 1:
        if key not in _PROGRAMS_PER_SM:  # the variant that splitting sizes
            _PROGRAMS_PER_SM[key] = _programs_per_sm(kernel, q.device)
        merge_into(o_part, lse_part, out, lse)
    return out, lse
