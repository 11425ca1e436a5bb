"""Rotary position embedding (RoPE) with a precomputed cos/sin table.

Uses Hugging Face's non-interleaved `rotate_half` layout (the first half of each head pairs with the
second half) and reproduces its numerics: inverse frequencies and the cos/sin table are computed in
float32 exactly as transformers does, then cast to the activations' dtype before the rotation, so
our greedy tokens can equal transformers' in bfloat16 too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from infinite_llm.config import ConfigError, RopeScaling


def compute_inv_freq(head_dim: int, rope_theta: float, scaling: RopeScaling) -> Tensor:
    """Inverse frequencies [head_dim // 2] in float32, bit-equal to transformers' RoPE init."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ConfigError(f"rope_type {scaling.rope_type!r} is not supported")


def _llama3_inv_freq(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, blend in between.

    Follows transformers' `_compute_llama3_parameters` operation by operation.
    """
    factor = scaling.factor
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to flat token batches: each token carries its own position.

    The cos/sin table covers positions [0, max_positions); positions outside it are not checked
    here (that would cost a device sync per layer), so callers must bound sequence length.
    """

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        scaling: RopeScaling,
        max_positions: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {head_dim}")
        inv_freq = compute_inv_freq(head_dim, rope_theta, scaling).to(device)
        # Same product as transformers (`position.float() * inv_freq`), so the same cos/sin bits.
        freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_positions, head_dim // 2]
        self.register_buffer("sin", freqs.sin(), persistent=False)  # [max_positions, head_dim // 2]

    def at(self, positions: Tensor, dtype: torch.dtype) -> RopeTable:
        """RoPE at `positions` [T] in `dtype`, for every layer of one step."""
        return RopeTable(positions, self.cos, self.sin, dtype)

    def forward(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T], q [T, H, D], k [T, KVH, D] -> rotated (q, k) in their input dtype."""
        table = self.at(positions, q.dtype)
        return table.rotate(q), table.rotate(k)


@dataclass(frozen=True)
class RopeTable:
    """RoPE at one step's positions, shared by every layer of the step.

    The rows of the step's positions are gathered at the first `rotate` and kept for the later
    layers. The Triton backend of `layers.Rotary` reads `positions` and the full tables itself,
    so a CUDA step never builds them (nor records them into its graph).

    `x * cos + rotate_half(x) * sin` as transformers computes it, in two products and a sum over
    whole heads: the first half's `x1 * cos + (-x2) * sin` is `x1 * cos + x2 * (-sin)` bit for bit
    (negation is exact), so the sign lives in the rows and rotate_half is a swap of halves.
    """

    positions: Tensor  # [T]
    cos_table: Tensor  # [max_positions, D // 2] float32
    sin_table: Tensor  # [max_positions, D // 2] float32
    dtype: torch.dtype

    @cached_property
    def rows(self) -> tuple[Tensor, Tensor]:
        """([T, 1, D] (cos, cos), [T, 1, D] (-sin, sin)) in `dtype`."""
        cos = self.cos_table[self.positions].to(self.dtype)  # [T, D // 2]
        sin = self.sin_table[self.positions].to(self.dtype)
        return (torch.cat((cos, cos), dim=-1).unsqueeze(1),
                torch.cat((-sin, sin), dim=-1).unsqueeze(1))

    def rotate(self, x: Tensor) -> Tensor:
        """x [T, heads, D] (any heads, e.g. q's and k's side by side) -> rotated x."""
        cos, sin = self.rows
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, x1), dim=-1) * sin
