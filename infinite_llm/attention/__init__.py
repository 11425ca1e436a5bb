"""Attention as partials with log-sum-exp over paged KV, and their exact merge.

`attention_ops(device)` picks the implementation: the Triton kernels on CUDA when triton imports,
the torch reference otherwise. Both have the reference's signatures, so callers never branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from infinite_llm.attention import reference
from infinite_llm.kvcache.paged import PagedBatch

if TYPE_CHECKING:  # the kernels import triton: only where CUDA kernels run
    from infinite_llm.kernels.decode import DecodeConfig

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
        from infinite_llm.kernels import attention as kernels
    except ImportError as error:
        logger.warning("triton kernels unavailable (%s); using the torch reference", error)
        return REFERENCE_OPS
    return AttentionOps(kernels.store_kv, kernels.paged_attention, kernels.merge)



def graph_decode_config(q: Tensor, k_cache: Tensor, max_kv: int) -> DecodeConfig:
    """The decode launch a CUDA graph replays for `q`'s rows of up to `max_kv` keys (q: only its
    shape counts): the split count they get now, rounded down to a power of two (so few graphs
    cover all steps, and the launch stays within one round of resident programs), each row
    dividing its own keys over the splits (steps differ in lengths, not in launch shape), and
    the tiles for that."""
    from infinite_llm.kernels import attention as kernels

    config = kernels.default_config(k_cache, q.shape[0])
    splits = kernels.choose_splits(q.shape[0], q, k_cache, max_kv, config)
    splits = 1 << (splits.bit_length() - 1)
    config = kernels.long_tiles(config, k_cache, q.shape[0], max_kv // splits)
    return replace(config, splits=splits, split_per_row=True)


def graph_decode_configs(q: Tensor, k_cache: Tensor, max_kv: int) -> list[DecodeConfig]:
    """Every `graph_decode_config` that steps of `q`'s rows with up to `max_kv` keys can get:
    the split counts up to the largest, each with tiles of 64, and the largest also with tiles
    of 128 where `long_tiles` gives them (fewer keys never take more splits)."""
    from infinite_llm.kernels import attention as kernels

    top = graph_decode_config(q, k_cache, max_kv)
    base = kernels.default_config(k_cache, q.shape[0])
    assert top.splits is not None
    return [*(replace(base, splits=1 << i, split_per_row=True)
              for i in range(top.splits.bit_length())),
            *([top] if top.block_n != base.block_n else [])]


def graph_decode_ops(config: DecodeConfig) -> AttentionOps:
    """The Triton ops with the decode launch fixed to `config`."""
    from infinite_llm.kernels import attention as kernels

    return AttentionOps(kernels.store_kv, partial(kernels.decode_attention, config=config),
                        kernels.merge)
