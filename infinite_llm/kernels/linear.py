"""Triton kernels for decode-sized linears (1-64 rows) on GPU: a GEMV for one row, a tile kernel
for 2-16 rows and a split-K kernel for 2-64 rows, with the tuning table (`splitk_tiles`) that says
which matrices each takes.

Importing this module imports triton; the Triton backend of `infinite_llm.models.layers.Linear`
picks a kernel for each product by its row count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infinite_llm.kernels.common import next_pow2, pdl_args, wait_for_inputs

# Decode-sized linears (1-64 rows): the product is a read of the weight matrix and little
# else, and there cuBLAS falls short of the copy bandwidth, most on the smaller matrices. Each
# program streams whole weight rows, evicted first from L2 (read once per step); x stays in L2.
# One row takes the GEMV (FMAs); 2-64 rows the split-K kernel on the matrices `splitk_tiles`
# names, else the tile kernel up to 16 rows and cuBLAS beyond (both on tensor cores). Timed as a
# step's linears in one CUDA graph on an H100 (`benchmarks/linears.py --step`), the tile kernel
# with PDL is 1.03x cuBLAS at 4 and 16 rows and loses at 32 (0.98x) and 64 (0.96x); per matrix
# (`--matrices`), the split-K kernel beats both where `splitk_tiles` says.
SKINNY_MAX_ROWS = 16
SPLITK_MAX_ROWS = 64
_GEMV_BLOCK_K = 512
# Bytes of its weight slice each program asks L2 for before it waits for x (`_prefetch_rows`).
# The best of 32-128 KB in an H100's decode steps (batches 1 and 16 at 1K 0.5% and 0.8% faster,
# batch 64 level; `python -P benchmarks/decode_e2e.py --batches 1,16,64 --contexts 1K`): 64 KB for
# the tensor-core kernels, 32 KB for the GEMV (64 KB slowed batch 1 there).
_PREFETCH_BYTES = 65536
_GEMV_PREFETCH_BYTES = 32768


@triton.jit
def _prefetch_rows(w_ptr, offs_n, N, K, k_start, NUM_K: tl.constexpr):
    """Ask L2 for elements [k_start, k_start + NUM_K) of the 16-bit weight rows `offs_n`, one
    128-byte line at a time, holding no registers. A program calls it before
    `wait_for_inputs`: with PDL it runs while the short kernel before (a norm, RoPE, the merge,
    SiLU * up) still has the GPU, whose DRAM would otherwise idle then. Rows and columns are
    clamped into the matrix (the lines past a split's share are read by its neighbour)."""
    lines = tl.arange(0, NUM_K // 64) * 64
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    ptrs = w_ptr + rows[:, None] * K + tl.minimum(k_start + lines, K - 64)[None, :]
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                 PREFETCH_K: tl.constexpr, PDL: tl.constexpr):
    """y[n] = sum_k x[k] * w[n, k] (+ b[n]), products summed in float32.

    The first weight tile is read, and the next PREFETCH_K columns asked of L2, before
    `wait_for_inputs`: no kernel writes weights, so with PDL that read overlaps the end of the
    kernel that produces x."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None], other=0.0,
                eviction_policy="evict_first")
    _prefetch_rows(w_ptr, offs_n, N, K, BLOCK_K, PREFETCH_K)
    wait_for_inputs(PDL)
    acc = w.to(tl.float32) * tl.load(x_ptr + offs_k).to(tl.float32)[None, :]
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * K + k0 + offs_k[None, :], mask=n_mask[:, None],
                    other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def skinny_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether `gemv` (one row), `splitk_linear` (2-64 rows, where `splitk_tiles` has tiles) or
    `skinny_linear` (2-16 rows) can take this product: bf16/fp16, the weight's dtype, a width
    that is a multiple of 512, rows contiguous."""
    return (x.dim() == 2 and 0 < x.shape[0] <= SPLITK_MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.shape[1] % _GEMV_BLOCK_K == 0
            and x.stride(1) == 1 and weight.is_contiguous())


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [1, K] @ weight [N, K].T (+ bias) for one-row `skinny_fits` inputs; tiles from a sweep
    on an H100 over Llama-3-8B's matrices."""
    n, k = weight.shape
    y = x.new_empty(1, n)
    _gemv_kernel[(triton.cdiv(n, 16),)](x, weight, weight if bias is None else bias, y, n, k,
                                        HAS_BIAS=bias is not None, BLOCK_N=16,
                                        BLOCK_K=_GEMV_BLOCK_K, STAGES=4, num_warps=8,
                                        PREFETCH_K=_GEMV_PREFETCH_BYTES // (16 * 2),
                                        **pdl_args(x.device, launch=True))
    return y


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PREFETCH_K: tl.constexpr,
                   PDL: tl.constexpr):
    """y = x @ w.T (+ b) for up to BLOCK_M rows on tensor cores, accumulated in float32: each
    program streams BLOCK_N whole weight rows (the first tile read and the next PREFETCH_K
    columns asked of L2 before `wait_for_inputs`, as the GEMV does); x, a few hundred KB, stays
    in L2."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None], other=0.0,
                eviction_policy="evict_first")
    _prefetch_rows(w_ptr, offs_n, N, K, BLOCK_K, PREFETCH_K)
    wait_for_inputs(PDL)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None],
                other=0.0)
    acc = tl.dot(x, tl.trans(w))
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + offs_k[None, :],
                    mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + k0 + offs_k[None, :], mask=n_mask[:, None],
                    other=0.0, eviction_policy="evict_first")
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, block_n: int = 32,
                  block_k: int = 512, stages: int = 4, warps: int = 4) -> Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) for `skinny_fits` inputs of 2-16 rows; the default
    tiles are the sweep's best at 16 rows (K must be a multiple of block_k; `linears.py --step`
    also tries up to 64 rows)."""
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty(m, n)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, y, m, n, k, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(16, next_pow2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        STAGES=stages, PREFETCH_K=_PREFETCH_BYTES // (block_n * 2), num_warps=warps,
        **pdl_args(x.device, launch=True))
    return y


# Rows 2-64: each program holds BLOCK_N weight rows as the M side of its dot (the tensor cores'
# wide side, as cuBLAS arranges skinny products) and all the rows of x as the N side. Where the
# weight has few tiles of BLOCK_N rows and a long K (Llama's down_proj: 64 tiles of 14336),
# SPLIT_K programs share a tile's K: each writes a float32 partial, and the last to finish (a
# per-tile counter) sums them and writes y, then zeroes the counter for the next launch, so no
# reduce kernel follows.
_COUNTERS: dict[torch.device, list[Tensor]] = {}


def _tile_counters(device: torch.device, n: int) -> Tensor:
    """At least `n` zeroed int32 counters, one per output tile; every launch leaves them zero
    again. Shared by the device's split-K launches, which therefore run one at a time (one
    stream). Buffers outgrown are kept: CUDA graphs captured with them still use them."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < n:
        buffers.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


@triton.jit
def _splitk_kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm,
                   stride_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   STAGES: tl.constexpr, PREFETCH_K: tl.constexpr, PDL: tl.constexpr):
    """y = x @ w.T (+ b): program (n tile, split) sums acc[BLOCK_N, BLOCK_M] = w_tile @ x_tile.T
    over its share of K, [split * K / SPLIT_K, (split + 1) * K / SPLIT_K)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    k_per_split = K // SPLIT_K
    k_lo = split * k_per_split
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * K
    w = tl.load(w_rows + k_lo + offs_k[None, :], mask=n_mask[:, None], other=0.0,
                eviction_policy="evict_first")
    _prefetch_rows(w_ptr, offs_n, N, K, k_lo + BLOCK_K, PREFETCH_K)
    wait_for_inputs(PDL)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_lo + offs_k[None, :],
                mask=m_mask[:, None], other=0.0)
    acc = tl.dot(w, tl.trans(x))
    for k0 in tl.range(k_lo + BLOCK_K, k_lo + k_per_split, BLOCK_K, num_stages=STAGES):
        w = tl.load(w_rows + k0 + offs_k[None, :], mask=n_mask[:, None], other=0.0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k0 + offs_k[None, :],
                    mask=m_mask[:, None], other=0.0)
        acc += tl.dot(w, tl.trans(x))
    offs_tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + offs_m[None, :]
    last = True
    if SPLIT_K > 1:
        tl.store(part_ptr + (tile * SPLIT_K + split) * BLOCK_N * BLOCK_M + offs_tile, acc)
        tl.debug_barrier()  # every thread's partial is written before the count says so
        last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        if SPLIT_K > 1:
            for other in tl.static_range(SPLIT_K):
                if other != split:  # read past L1: it may hold an earlier launch's partial
                    acc += tl.load(part_ptr + (tile * SPLIT_K + other) * BLOCK_N * BLOCK_M
                                   + offs_tile, cache_modifier=".cg")
            tl.store(count_ptr + tile, 0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None],
                 acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def splitk_tiles(rows: int, n: int, k: int) -> tuple[int, int, int, int, int] | None:
    """(block_n, block_k, split_k, stages, warps) of `splitk_linear` for `rows` x [n, k], or None
    where the tile kernel (up to 16 rows) or cuBLAS is as fast. From `benchmarks/linears.py
    --matrices 16,32,64` on an H100 (each matrix 32 times in one CUDA graph): wide matrices
    (gate_up, lm_head) 1.03-1.08x the faster of the two, Llama-3-8B's QKV 1.07-1.10x up to 32
    rows (0.97x at 64), down_proj's long K with 2 splits 1.04-1.06x at 32-64 rows (the tile
    kernel is as fast at 16); o_proj's 4096 x 4096 is the others'."""
    if n >= 16384:
        return (64, 128, 1, 3, 4) if rows <= 32 else (128, 128, 1, 3, 8)
    if rows <= 32 and n >= 6144:
        return (64, 128, 1, 4, 4)
    if rows > SKINNY_MAX_ROWS and k >= 8192:
        return (64, 128, 2, 4, 4)
    return None


def splitk_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, block_n: int = 64,
                  block_k: int = 128, split_k: int = 1, stages: int = 4,
                  warps: int = 4) -> Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) for up to 64 rows (K a multiple of
    split_k * block_k); `splitk_tiles` gives the tiles the engine uses."""
    m, k = x.shape
    n = weight.shape[0]
    if k % (split_k * block_k):
        raise ValueError(f"K={k} is not a multiple of split_k * block_k")
    y = x.new_empty(m, n)
    tiles = triton.cdiv(n, block_n)
    block_m = max(16, next_pow2(m))
    if split_k > 1:
        part = x.new_empty(tiles * split_k * block_n * block_m, dtype=torch.float32)
        counters = _tile_counters(x.device, tiles)
    else:
        part = counters = y  # placeholders, never touched
    _splitk_kernel[(tiles, split_k)](
        x, weight, weight if bias is None else bias, y, part, counters,
        m, n, k, x.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, STAGES=stages,
        PREFETCH_K=_PREFETCH_BYTES // (block_n * 2), num_warps=warps,
        **pdl_args(x.device, launch=True))
    return y
