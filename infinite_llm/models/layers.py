"""The model's layers, each holding the backend it runs on, picked once for its device and dtype,
so that `llama.py` is plain math with no device branch:

- torch, everywhere: transformers' numerics, so greedy tokens equal Hugging Face's;
- oneDNN's packed weights for float32 linears on CPU, once the weights are loaded
  (`Linear.process_weights_after_loading`);
- the Triton kernels of `infinite_llm.kernels` on CUDA devices where triton imports: one launch
  each for RMSNorm (alone, or after the residual add), RoPE and SiLU(gate) * up, and the
  decode-sized linears.

The torch backends are the functions below with the Triton kernels' signatures
(`rms_norm`, `add_rms_norm`, `silu_mul`), what the GPU tests compare the kernels with. A layer
keeps the backend of the device it was built on: build the model where it runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinite_llm.models.rope import RopeTable

try:  # the Triton kernels, for layers built on CUDA devices
    from infinite_llm.kernels import elementwise
    from infinite_llm.kernels import linear as linear_kernels
except ImportError:  # no triton (CPU-only installs): every layer runs its torch backend
    elementwise = linear_kernels = None

LinearFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x, weight, bias) -> y
_Linear = TypeVar("_Linear", bound="Linear")

# Rows for which a float32 product on CPU takes oneDNN's packed weight (the kernel torch.compile's
# CPU backend uses) instead of F.linear (MKL): decode batches. On a 2-core AVX2 CPU a step's
# products ran 1.01-1.82x faster there at 1-128 rows, and 0.93-0.94x at 1024
# (`python benchmarks/throughput.py --linears`).
PACKED_ROWS = range(1, 129)


def _triton(device: torch.device | str) -> bool:
    """Whether layers on `device` run the Triton kernels: a CUDA device, with triton installed."""
    return elementwise is not None and torch.device(device).type == "cuda"


def pack_weight(weight: Tensor) -> Tensor | None:
    """oneDNN's blocked copy of a float32 CPU weight [N, K] for `packed_linear`, or None where
    torch has no oneDNN linear for this CPU (then F.linear runs every product)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return None
    try:  # a private op: builds for other CPUs (or other torch versions) may lack it
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # for 32 rows
    except (AttributeError, RuntimeError):
        return None


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) by oneDNN, from `pack_weight(weight)`, with no activation fused."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass(frozen=True, slots=True)
class PackedLinear:
    """The oneDNN backend of `Linear`: `PACKED_ROWS` rows on the packed weight, others by
    F.linear."""

    packed: Tensor  # pack_weight(weight)

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if x.shape[0] in PACKED_ROWS:
            return packed_linear(x, self.packed, bias)
        return F.linear(x, weight, bias)


def triton_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The Triton backend of `Linear`: 1-64 bf16/fp16 rows (decode at batch 1-64) go to the
    kernel that reads the weight faster than cuBLAS does at their row count (a GEMV for one row;
    the split-K kernel on the matrices `splitk_tiles` names, else the tile kernel for 2-16 rows:
    `python benchmarks/linears.py --step 1,16 --matrices 16,32,64`), everything else to F.linear.
    """
    if linear_kernels.skinny_fits(x, weight):
        rows = x.shape[0]
        if rows == 1:
            return linear_kernels.gemv(x, weight, bias)
        tiles = linear_kernels.splitk_tiles(rows, *weight.shape)
        if tiles is not None:
            return linear_kernels.splitk_linear(x, weight, bias, *tiles)
        if rows <= linear_kernels.SKINNY_MAX_ROWS:
            return linear_kernels.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """x @ weight.T (+ bias), with nn.Linear's parameter names (checkpoints load unchanged),
    run by its backend: `triton_linear` on CUDA, F.linear elsewhere, and for float32 on CPU
    `PackedLinear` once `process_weights_after_loading` has run.

    The weight may be another module's (tied input and output embeddings, as transformers ties
    them); `Linear.empty` makes new parameters."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.weight = weight  # [n_out, n_in]
        self.bias = bias  # [n_out] or None
        self.product: LinearFn = triton_linear if _triton(weight.device) else F.linear

    @classmethod
    def empty(cls: type[_Linear], n_in: int, n_out: int, bias: bool, dtype: torch.dtype,
              device: torch.device) -> _Linear:
        """Over new uninitialized parameters: nothing random is computed for weights the loader
        overwrites anyway."""
        def parameter(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))

        return cls(parameter(n_out, n_in), parameter(n_out) if bias else None)

    def process_weights_after_loading(self) -> bool:
        """Take the oneDNN backend where the weight has a packed copy (float32 on CPU; it holds
        as many bytes again as the weight). Returns whether it did."""
        packed = pack_weight(self.weight)
        if packed is not None:
            self.product = PackedLinear(packed)
        return packed is not None

    def forward(self, x: Tensor) -> Tensor:
        return self.product(x, self.weight, self.bias)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [T, 2 * inter] (gate first) -> silu(gate) * up [T, inter]."""
    gate, up = gate_up.chunk(2, dim=-1)
    h = F.silu(gate)  # one fresh contiguous [T, inter] buffer, then multiplied in place
    h *= up
    return h


class GateUpSiLU(Linear):
    """x -> SiLU(x @ gate.T) * (x @ up.T): an MLP's gate and up projections as one weight
    [2 * inter, hidden] (gate's rows first; the loader fills it from the checkpoint's two
    tensors) and its activation, so that each backend chooses how to run the products.

    Triton: the fused product, then one kernel for the activation. torch: the fused product
    where it is one pass over the weight (one row, a matrix-vector product; oneDNN's packed
    rows), else gate and up as two products into two outputs, as transformers runs them: MKL
    runs the fused width slower (the torch profiler at batch 32 on a 2-core CPU; end to end,
    `python benchmarks/throughput.py`)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__(weight, bias)
        on_triton = _triton(weight.device)
        self._silu_mul = elementwise.silu_mul if on_triton else silu_mul
        self.fused_rows = range(sys.maxsize) if on_triton else range(1, 2)  # one product

    def process_weights_after_loading(self) -> bool:
        packed = super().process_weights_after_loading()
        if packed:
            self.fused_rows = PACKED_ROWS
        return packed

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] in self.fused_rows:
            return self._silu_mul(super().forward(x))
        gate_weight, up_weight = self.weight.chunk(2)
        h = F.silu(F.linear(x, gate_weight), inplace=True)
        h *= F.linear(x, up_weight)
        return h


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)), computed in float32 and cast back before the
    weight, as transformers does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`residual += x`, then `rms_norm(residual)`. The add is commutative, so the residual
    stream has transformers' bits for `residual + x`."""
    residual += x
    return rms_norm(residual, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm, alone or (`add`) after the residual add: one kernel each on Triton."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps
        if _triton(device):
            self._norm, self._add_norm = elementwise.rms_norm, elementwise.add_rms_norm
        else:
            self._norm, self._add_norm = rms_norm, add_rms_norm

    def forward(self, x: Tensor) -> Tensor:
        return self._norm(x, self.weight, self.eps)

    def add(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual += x` in place, then the norm of the sum."""
        return self._add_norm(x, residual, self.weight, self.eps)


def rotate(rope: RopeTable, qk: Tensor, heads: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The torch backend of `Rotary`: q's and k's heads side by side, one rotation for both
    (into new tensors)."""
    return rope.rotate(qk).split(heads, dim=1)


def _rotate_in_place(rope: RopeTable, qk: Tensor, heads: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The Triton backend of `Rotary`: one kernel rotates q and k where they are; it reads the
    positions and the full tables itself, so the step never gathers `rope.rows`."""
    q, k = qk.split(heads, dim=1)
    elementwise.rotary_(rope.positions, q, k, rope.cos_table, rope.sin_table)
    return q, k


class Rotary(nn.Module):
    """Applies a step's RoPE to q and k, side by side in a fused QKV."""

    def __init__(self, num_heads: int, num_kv_heads: int, device: torch.device) -> None:
        super().__init__()
        self.heads = (num_heads, num_kv_heads)
        self._rotate = _rotate_in_place if _triton(device) else rotate

    def forward(self, rope: RopeTable, qk: Tensor) -> tuple[Tensor, Tensor]:
        """qk [T, num_heads + num_kv_heads, head_dim] -> (q [T, num_heads, head_dim],
        k [T, num_kv_heads, head_dim]), rotated."""
        return self._rotate(rope, qk, self.heads)
