"""Pieces shared by the decode and prefill kernels: one online-softmax step and the finish.

Scores are kept in base 2 (`qk_scale = scale * log2(e)`, `exp2`), as in FlashAttention-2, so the
running max `m` and the final lse are in log2 units until `finish` turns lse into natural log.
A query row that has seen no visible key keeps `m = -inf, l = 0`: the `m_safe` substitution keeps
`-inf - -inf` (NaN) out of the update, and `finish` gives it out = 0, lse = -inf like the reference.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = 1.4426950408889634


# Programmatic dependent launch (Hopper and newer). A kernel launched with PDL is scheduled while
# the kernel before it still runs, once that one has called `release_dependents` (at its start
# here), and waits in `wait_for_inputs` until it has finished and its writes are visible. A decode
# step is hundreds of short kernels, so the gaps between them are a real part of it. The norms,
# RoPE, SiLU * up, the KV store and the decode-sized linears (which read their first weight tile
# and ask L2 for more before they wait, so the weight stream starts under the kernel before) are
# launched so. Decode and merge only release: launched with PDL they ran a decode -> merge ->
# decode chain up to 0.67x slower at 1K-32K x 1 on an H100; decode alone launched so gained at
# batch 1, lost up to 7% at batch 8 and left the engine's steps level
# (`python benchmarks/attention_kernels.py` with and without INFINITE_LLM_PDL=0).
# INFINITE_LLM_PDL=0 launches everything the plain way (benchmarks compare the two).
PDL_ENABLED = os.environ.get("INFINITE_LLM_PDL", "1") != "0"


@functools.cache
def _pdl_capable(index: int) -> bool:
    return (torch.cuda.get_device_capability(index)[0] >= 9
            and hasattr(tl.extra, "cuda") and hasattr(tl.extra.cuda, "gdc_wait"))


def pdl_args(device: torch.device, launch: bool = False) -> dict[str, bool]:
    """Launch arguments of a kernel with a `PDL` constexpr: True where the GPU has PDL; with
    `launch`, the kernel (which then calls `wait_for_inputs(PDL)` first) is launched with it."""
    on = (PDL_ENABLED and device.type == "cuda"
          and _pdl_capable(device.index if device.index is not None
                           else torch.cuda.current_device()))
    return {"PDL": True, "launch_pdl": True} if on and launch else {"PDL": on}


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let a PDL-launched kernel after this one be scheduled now (it still waits for this one's
    writes in `wait_for_inputs`); a plain launch after this one is unaffected."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """With a PDL launch: wait until the kernel before has finished and its writes are visible,
    then release the next. Every program calls this before it reads what an earlier kernel wrote
    or writes what one reads, so the chain stays ordered."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    release_dependents(PDL)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def dot_precision(dtype_size: int) -> str:
    """float32 caches get exact float32 dots (ieee); 16-bit dots are exact products anyway."""
    return "ieee" if dtype_size == 4 else "tf32"


@triton.jit
def softmax_step(
    q,  # [M, BLOCK_D] in the cache dtype
    k,  # [BLOCK_N, BLOCK_D]
    v,  # [BLOCK_N, BLOCK_D]
    visible,  # [M, BLOCK_N] bool; ignored unless MASKED
    m_i,  # [M] float32 running max (log2 units)
    l_i,  # [M] float32 running sum of exp2
    acc,  # [M, BLOCK_D] float32 unnormalized output
    qk_scale,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def finish(m_i, l_i, acc):
    """(m, l, acc) -> (out [M, BLOCK_D] float32, lse [M] natural log; -inf where nothing seen)."""
    seen = l_i > 0
    l_one = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_one)) * LN2, float("-inf"))
    return acc / l_one[:, None], lse


@triton.jit
def load_kv_tile(
    k_ptr,  # the cache at this kv head: k_cache + kv_head * stride_kh
    v_ptr,  # likewise for v
    table_ptr,  # this row's block table: block_tables + row * stride_table
    tok,  # [BLOCK_N] int32 key indices within the row
    valid,  # [BLOCK_N] bool; used only when MASK_N
    offs_d,  # [BLOCK_D]
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    PAGE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,
):
    """Gather keys and values [BLOCK_N, BLOCK_D] of a tile through the block table.

    Each key's head row is HEAD_DIM contiguous elements, so the loads are 16-byte vectors along d;
    the page ids are re-read per key but hit L1 (they are 4 bytes against 2 * HEAD_DIM * 2)."""
    if MASK_N:
        page = tl.load(table_ptr + tok // PAGE, mask=valid, other=0).to(tl.int64)
    else:
        page = tl.load(table_ptr + tok // PAGE).to(tl.int64)
    slot = tok % PAGE
    k_off = page * stride_kb + slot * stride_kt
    v_off = page * stride_vb + slot * stride_vt
    if MASK_N or BLOCK_D != HEAD_DIM:
        mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :], mask=mask, other=0.0)
    else:
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :])
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :])
    return k, v
