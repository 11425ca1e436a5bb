"""Write the step's new keys and values into their cache slots (block * block_size + offset)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from infinite_llm.kernels.common import next_pow2, pdl_args, wait_for_inputs


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slots_ptr,  # [num_tokens] int64
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ckb, stride_ckt, stride_ckh,
    stride_cvb, stride_cvt, stride_cvh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per cache block
    PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    page = slot // PAGE
    offset = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM) & (slot >= 0)
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(k_cache_ptr + page * stride_ckb + offset * stride_ckt + offs_h * stride_ckh + offs_d,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + page * stride_cvb + offset * stride_cvt + offs_h * stride_cvh + offs_d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slots: Tensor,  # [num_tokens] int64, block * block_size + offset
    k: Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: Tensor,  # [num_tokens, num_kv_heads, head_dim]
) -> None:
    """Same contract as `reference.store_kv`; k and v may be strided views (e.g. of a fused QKV).
    A negative slot (`attention.PAD_SLOT`, the padding rows of a CUDA-graph batch) writes
    nothing."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache must be contiguous in head_dim")
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim), PAGE=k_cache.shape[1], **pdl_args(k.device, launch=True),
    )
