"""Triton kernels for the model's work on GPU besides attention: RMSNorm (alone, or after the
residual add), RoPE, SiLU(gate) * up, and one-row linears.

In torch each is a chain of 3-8 kernels (casts, powers, means, products) that read and write the
activations again and again; at decode batch sizes a step is hundreds of such tiny launches, so
they cost more than their bytes. Each kernel here is one launch that rounds where torch rounds
(products to the activation dtype before they are added, RMSNorm in float32 cast back before the
weight), so results match the torch path up to the order of a float32 sum.

Imported only where triton is installed; `llama.py` and `rope.py` use these for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from infinite_llm.attention.triton.common import pdl_args, wait_for_inputs


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def _norm_store(x, w_ptr, out_ptr, offs, mask, n_cols, eps):
    """Store weight * (x * rsqrt(mean(x^2) + eps)) for one row x (float32), rounding as torch
    does: the normalised row to the output dtype before the weight multiplies it."""
    inv = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    dtype = out_ptr.dtype.element_ty
    y = (x * inv).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (w * y).to(dtype), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    _norm_store(x, w_ptr, out_ptr + row * stride_out, offs, mask, n_cols, eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., hidden] -> weight * (x * rsqrt(mean(x^2) + eps)) in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = x2.new_empty(x2.shape)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0),
                                         x2.shape[1], eps, BLOCK=_pow2(x2.shape[1]),
                                         num_warps=4 if x2.shape[1] <= 4096 else 8,
                                         **pdl_args(x.device, launch=True))
    return out.view(x.shape)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_out, n_cols,
                         eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(r_ptr.dtype.element_ty)  # the residual stream, rounded as torch's add rounds it
    tl.store(r_ptr + row * stride_r + offs, s, mask=mask)
    _norm_store(s.to(tl.float32), w_ptr, out_ptr + row * stride_out, offs, mask, n_cols, eps)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`residual += x` in place, then `rms_norm(residual)`: one read of both instead of an add
    kernel and a norm kernel. x and residual [T, hidden], rows contiguous."""
    assert x.shape == residual.shape and x.stride(-1) == residual.stride(-1) == 1
    out = x.new_empty(x.shape)
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](x, residual, weight, out, x.stride(0),
                                            residual.stride(0), out.stride(0), x.shape[1], eps,
                                            BLOCK=_pow2(x.shape[1]),
                                            num_warps=4 if x.shape[1] <= 4096 else 8,
                                            **pdl_args(x.device, launch=True))
    return out


@triton.jit
def _rotate_heads(x_ptr, t, stride_t, stride_h, c, s, offs_d, d_mask,
                  NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    """x1 * cos - x2 * sin, x2 * cos + x1 * sin for every head of one token, in place."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < NUM_HEADS)[:, None] & d_mask[None, :]
    first = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    a = (x1 * c).to(dtype).to(tl.float32)
    b = (x2 * s).to(dtype).to(tl.float32)
    tl.store(first, (a - b).to(dtype), mask=mask)
    a = (x2 * c).to(dtype).to(tl.float32)
    b = (x1 * s).to(dtype).to(tl.float32)
    tl.store(first + HALF, (a + b).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt,
                   stride_kh, NUM_Q: tl.constexpr, NUM_K: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_K: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                   PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HALF
    dtype = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + pos * HALF + offs_d, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + pos * HALF + offs_d, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, c[None, :], s[None, :], offs_d, d_mask,
                  NUM_Q, BLOCK_Q, HALF)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, c[None, :], s[None, :], offs_d, d_mask,
                  NUM_K, BLOCK_K, HALF)


def rotary_(positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place (views of a fused QKV are fine) by the
    float32 cos/sin tables [max_positions, D // 2] at `positions` [T]."""
    num_tokens, num_q, dim = q.shape
    if not num_tokens:
        return
    if q.stride(-1) != 1 or k.stride(-1) != 1 or q.dtype != k.dtype:
        raise ValueError("q and k must share a dtype and be contiguous in head_dim")
    half = dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        NUM_Q=num_q, NUM_K=k.shape[1], BLOCK_Q=_pow2(num_q), BLOCK_K=_pow2(k.shape[1]),
        HALF=half, BLOCK_D=_pow2(half), **pdl_args(q.device, launch=True),
    )


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, inter, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gate_up_ptr + t * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + t * stride_in + inter + offs, mask=mask, other=0.0)
    h = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, (h * u.to(tl.float32)).to(dtype), mask=mask)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [T, 2 * inter] (gate first) -> silu(gate) * up [T, inter]."""
    num_tokens, width = gate_up.shape
    inter = width // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = gate_up.new_empty(num_tokens, inter)
    block = min(1024, _pow2(inter))
    if num_tokens:
        _silu_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block,
            **pdl_args(gate_up.device, launch=True))
    return out


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
# The best of 32-128 KB in an H100's decode steps (benchmarks/results/decode_e2e_h100.txt, run
# 38: b1 and b16 1K 0.5% and 0.8% faster, b64 level): 64 KB for the tensor-core kernels, 32 KB
# for the GEMV (64 KB slowed batch 1 there).
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
        HAS_BIAS=bias is not None, BLOCK_M=max(16, _pow2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
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
    block_m = max(16, _pow2(m))
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
