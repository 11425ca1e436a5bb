"""Triton kernels for the model's elementwise work on GPU: RMSNorm (alone, or after the residual
add), RoPE and SiLU(gate) * up.

In torch each is a chain of 3-8 kernels (casts, powers, means, products) that read and write the
activations again and again; at decode batch sizes a step is hundreds of such tiny launches, so
they cost more than their bytes. Each kernel here is one launch that rounds where torch rounds
(products to the activation dtype before they are added, RMSNorm in float32 cast back before the
weight), so results match the torch path up to the order of a float32 sum.

Importing this module imports triton; `infinite_llm.models.layers` picks these kernels for layers
built on CUDA devices.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from infinite_llm.kernels.common import next_pow2, pdl_args, wait_for_inputs


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
                                         x2.shape[1], eps, BLOCK=next_pow2(x2.shape[1]),
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
                                            BLOCK=next_pow2(x.shape[1]),
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
        NUM_Q=num_q, NUM_K=k.shape[1], BLOCK_Q=next_pow2(num_q), BLOCK_K=next_pow2(k.shape[1]),
        HALF=half, BLOCK_D=next_pow2(half), **pdl_args(q.device, launch=True),
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
    block = min(1024, next_pow2(inter))
    if num_tokens:
        _silu_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block,
            **pdl_args(gate_up.device, launch=True))
    return out
