"""`PagedBatch`: which keys of a paged KV pool each query of a step attends to.

The argument that the torch reference (`attention.reference`) and the Triton kernels
(`kernels.attention`) share, so either implementation takes the same batch. A *row* is one
sequence's queries attending to one contiguous run of KV (a segment) that lives in this pool:
keys at absolute positions `kv_start .. kv_start + kv_len - 1`, stored in the blocks of the
row's block table; causality is by absolute position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(slots=True)
class PagedBatch:
    cu_q_lens: Tensor  # [num_rows + 1] int64: queries of row i are q[cu_q_lens[i]:cu_q_lens[i+1]]
    q_positions: Tensor  # [num_tokens] int64, absolute positions
    block_tables: Tensor  # [num_rows, max_blocks] int32, padded with 0
    kv_starts: Tensor  # [num_rows] int64, absolute position of the row's first key
    kv_lens: Tensor  # [num_rows] int64, number of keys in the row
    q_lens: list[int]  # host copy of cu_q_lens' differences, for Python-side control flow
    kv_lens_host: list[int]  # host copy of kv_lens
    # The reference's per-batch key layouts, built by its `paged_attention` on first use and
    # reused by later layers; the fields above must not change once they exist (build a new
    # batch instead).
    layouts: list | None = field(default=None, repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return len(self.q_lens)
