"""Attention as partials with log-sum-exp over paged KV, and their exact merge.

`attention_ops(device)` picks the implementation: the Triton kernels on CUDA when triton imports,
the torch reference otherwise. Both have the reference's signatures, so callers never branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from infinite_llm.attention import reference
from infinite_llm.attention.reference import PagedBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AttentionOps:
    """The three operations DistAttention needs, from one implementation."""

    store_kv: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]
    paged_attention: Callable[[Tensor, Tensor, Tensor, PagedBatch, float], tuple[Tensor, Tensor]]
    merge: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


# The K/V slot of a padding row (CUDA-graph batches): the Triton store writes nothing for it.
PAD_SLOT = -1

REFERENCE_OPS = AttentionOps(reference.store_kv, reference.paged_attention, reference.merge)


def attention_ops(device: torch.device | str) -> AttentionOps:
    """Triton kernels for a CUDA device when triton is installed, else the torch reference."""
    if torch.device(device).type != "cuda":
        return REFERENCE_OPS
    try:
        from infinite_llm.attention import triton as kernels
    except ImportError as error:
        logger.warning("triton kernels unavailable (%s); using the torch reference", error)
        return REFERENCE_OPS
    return AttentionOps(kernels.store_kv, kernels.paged_attention, kernels.merge)



def graph_decode_splits(q: Tensor, k_cache: Tensor, max_kv: int) -> int:
    """Splits per row for a decode launch that a CUDA graph replays: what `max_kv` keys over
    `q`'s rows get now, rounded down to a power of two (so few graphs cover all steps, and the
    launch stays within one round of resident programs)."""
    from infinite_llm.attention import triton as kernels

    splits = kernels.choose_splits(q.shape[0], q, k_cache, max_kv,
                                   kernels.default_config(k_cache, q.shape[0]))
    return 1 << (splits.bit_length() - 1)


def graph_decode_ops(k_cache: Tensor, num_rows: int, splits: int) -> AttentionOps:
    """The Triton ops with the decode launch fixed: `splits` splits, each row dividing its own
    keys over them (the steps a graph replays differ in lengths, not in launch shape)."""
    from infinite_llm.attention import triton as kernels

    config = replace(kernels.default_config(k_cache, num_rows), splits=splits,
                     split_per_row=True)
    return AttentionOps(kernels.store_kv, partial(kernels.decode_attention, config=config),
                        kernels.merge)
