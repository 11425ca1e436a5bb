"""Attention as partials with log-sum-exp over paged KV, and their exact merge.

`attention_ops(device)` picks the implementation: the Triton kernels on CUDA when triton imports,
the torch reference otherwise. Both have the reference's signatures, so callers never branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

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
