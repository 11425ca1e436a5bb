"""The Triton attention kernels with the signatures of `infinite_llm.attention.reference`:
what `infinite_llm.attention.attention_ops` hands DistAttention on CUDA devices.

Importing this module imports triton; `attention_ops` imports it only on CUDA devices, so CPU
machines without triton never do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from infinite_llm.kernels.decode import (
    DecodeConfig,
    choose_splits,
    decode_attention,
    default_config,
    long_tiles,
)
from infinite_llm.kernels.merge import merge, merge_into
from infinite_llm.kernels.prefill import prefill_attention
from infinite_llm.kernels.store import store_kv

if TYPE_CHECKING:  # a type only: the kernels import nothing from the layers above them
    from infinite_llm.kvcache.paged import PagedBatch

__all__ = [
    "DecodeConfig",
    "choose_splits",
    "decode_attention",
    "default_config",
    "long_tiles",
    "merge",
    "merge_into",
    "paged_attention",
    "prefill_attention",
    "store_kv",
]


def paged_attention(
    q: Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    batch: PagedBatch,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Partial attention of every row -> (out [T, H, D] in q's dtype, lse [T, H] float32).

    All-decode batches take the split-K decode kernel, which spreads long contexts over the whole
    GPU; anything with a longer query run takes the prefill kernel (decode rows included)."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV cache of a layer must be contiguous in head_dim")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of "
                         f"{k_cache.shape[2]} kv heads")
    q = q if q.stride(-1) == 1 else q.contiguous()
    if batch.num_rows == q.shape[0] and all(n == 1 for n in batch.q_lens):
        return decode_attention(q, k_cache, v_cache, batch, scale)
    return prefill_attention(q, k_cache, v_cache, batch, scale)
