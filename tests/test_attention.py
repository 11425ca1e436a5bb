"""Partial attention over any split of paged KV, merged, equals ordinary causal attention."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.attention.reference import (
    _flash_attention_cpu,
    _softmax_attention,
    merge,
    paged_attention,
    store_kv,
)
from infinite_llm.kvcache.paged import PagedBatch


def _dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor):
    """Plain attention of queries at q_pos over keys at positions 0..len(k)-1 (SDPA, GQA)."""
    mask = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(0, 1)


@st.composite
def _case(draw):
    num_kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3]))
    block_size = draw(st.sampled_from([1, 4, 16]))
    num_seqs = draw(st.integers(1, 4))
    seqs = []
    for _ in range(num_seqs):
        kv_len = draw(st.integers(1, 70))
        q_len = draw(st.integers(1, kv_len))  # queries are the last q_len tokens (a chunk)
        cuts = sorted(draw(st.lists(st.integers(1, kv_len - 1), max_size=3, unique=True))
                      if kv_len > 1 else [])
        seqs.append((kv_len, q_len, cuts))
    return num_kv_heads, group, block_size, seqs, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(_case())
def test_split_paged_attention_merged_equals_sdpa(case) -> None:
    num_kv_heads, group, block_size, seqs, seed = case
    gen = torch.Generator().manual_seed(seed)
    head_dim, num_heads = 8, num_kv_heads * group
    # One pool per split piece: piece j of every sequence lives in pool j, in shuffled blocks.
    num_pieces = 1 + max(len(cuts) for _, _, cuts in seqs)
    pools = [
        (torch.zeros(320, block_size, num_kv_heads, head_dim),
         torch.zeros(320, block_size, num_kv_heads, head_dim))
        for _ in range(num_pieces)
    ]
    free = [torch.randperm(320, generator=gen).tolist() for _ in range(num_pieces)]
    rows: list[list[tuple[int, int, int, list[int]]]] = [[] for _ in range(num_pieces)]
    qs, expected = [], []
    for seq, (kv_len, q_len, cuts) in enumerate(seqs):
        k = torch.randn(kv_len, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(kv_len, num_kv_heads, head_dim, generator=gen)
        q = torch.randn(q_len, num_heads, head_dim, generator=gen)
        q_pos = torch.arange(kv_len - q_len, kv_len)
        qs.append((q, q_pos))
        expected.append(_dense_causal(q, k, v, q_pos))
        bounds = [0, *cuts, kv_len]
        for piece, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            blocks = [free[piece].pop() for _ in range(-(-(hi - lo) // block_size))]
            slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size
                                  for i in range(hi - lo)])
            store_kv(*pools[piece], slots, k[lo:hi], v[lo:hi])
            rows[piece].append((seq, lo, hi - lo, blocks))
    q_all = torch.cat([q for q, _ in qs])
    pos_all = torch.cat([p for _, p in qs])
    starts = torch.tensor([0] + [len(p) for _, p in qs]).cumsum(0).tolist()
    outs, lses = [], []
    for piece, piece_rows in enumerate(rows):
        # Each pool computes its partial for all query tokens; a sequence without KV here gets an
        # empty row (lse = -inf), as an instance that hosts nothing of that request would.
        by_seq = {seq: (lo, n, blocks) for seq, lo, n, blocks in piece_rows}
        width = max([len(b) for _, _, b in by_seq.values()] + [1])
        table, kv_starts, kv_lens = [], [], []
        for seq in range(len(seqs)):
            lo, n, blocks = by_seq.get(seq, (0, 0, []))
            table.append(blocks + [0] * (width - len(blocks)))
            kv_starts.append(lo)
            kv_lens.append(n)
        q_lens = [len(p) for _, p in qs]
        batch = PagedBatch(
            cu_q_lens=torch.tensor(starts), q_positions=pos_all,
            block_tables=torch.tensor(table, dtype=torch.int32),
            kv_starts=torch.tensor(kv_starts), kv_lens=torch.tensor(kv_lens),
            q_lens=q_lens, kv_lens_host=kv_lens,
        )
        o, s = paged_attention(q_all, *pools[piece], batch, head_dim**-0.5)
        outs.append(o)
        lses.append(s)
    out, _ = merge(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(out, torch.cat(expected), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("q_lens", [[1, 1, 1, 1], [3, 2, 4, 1], [5, 6, 7, 8], [0, 2, 1, 2]])
def test_rows_attended_together_equal_each_row_alone(q_lens: list[int]) -> None:
    """Rows batched into one call per group (queries padded to the group's longest, keys to
    its longest row) give each row what it gets attended alone: decode rows, prompts of
    different lengths, a mix, and a row without queries."""
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(16, 4, 2, 8, generator=gen)
    v_cache = torch.randn(16, 4, 2, 8, generator=gen)
    table = torch.tensor([[3, 5, 0], [7, 1, 2], [9, 0, 0], [4, 6, 8]], dtype=torch.int32)
    kv_lens = [6, 11, 2, 9]
    kv_starts = [0, 0, 3, 1]
    positions = [list(range(kv_starts[r] + kv_lens[r] - n, kv_starts[r] + kv_lens[r]))
                 for r, n in enumerate(q_lens)]
    q = torch.randn(sum(q_lens), 6, 8, generator=gen)

    def batch(rows: list[int]) -> PagedBatch:
        lens = [q_lens[r] for r in rows]
        return PagedBatch(
            cu_q_lens=torch.tensor([0, *itertools.accumulate(lens)]),
            q_positions=torch.tensor([p for r in rows for p in positions[r]], dtype=torch.long),
            block_tables=table[rows], kv_starts=torch.tensor(kv_starts)[rows],
            kv_lens=torch.tensor(kv_lens)[rows], q_lens=lens,
            kv_lens_host=[kv_lens[r] for r in rows],
        )

    out, lse = paged_attention(q, k_cache, v_cache, batch([0, 1, 2, 3]), 0.3)
    start = 0
    for r, n in enumerate(q_lens):
        o, s = paged_attention(q[start : start + n], k_cache, v_cache, batch([r]), 0.3)
        torch.testing.assert_close(out[start : start + n], o)
        torch.testing.assert_close(lse[start : start + n], s)
        start += n


def test_query_without_visible_keys_has_minus_inf_lse_and_zero_weight() -> None:
    k_cache = torch.randn(2, 4, 1, 8)
    q = torch.randn(1, 1, 8)
    batch = PagedBatch(
        cu_q_lens=torch.tensor([0, 1]), q_positions=torch.tensor([2]),
        block_tables=torch.tensor([[1]], dtype=torch.int32), kv_starts=torch.tensor([3]),
        kv_lens=torch.tensor([4]), q_lens=[1], kv_lens_host=[4],
    )
    out, lse = paged_attention(q, k_cache, k_cache, batch, 1.0)
    assert torch.isneginf(lse).all() and (out == 0).all()
    merged, _ = merge(torch.stack([out, torch.ones_like(out)]),
                      torch.stack([lse, torch.zeros_like(lse)]))
    torch.testing.assert_close(merged, torch.ones_like(out))


def test_fused_cpu_kernel_equals_spelled_out_softmax() -> None:
    """The fused CPU kernel the reference uses on CPU computes what the spelled-out math (its
    path on other devices) does, and gives a query that sees no key out = 0, as `_attend`
    assumes (only its lse needs setting to -inf)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=gen) for _ in range(3))
    visible = torch.rand(3, 1, 5, 11, generator=gen) < 0.6
    visible[1, 0, 2] = False
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    k, v = k.repeat(1, 1, 3, 1)[:, :, :11], v.repeat(1, 1, 3, 1)[:, :, :11]
    out, lse = _flash_attention_cpu(q, k, v, attn_mask=mask, scale=0.3)
    ref_out, ref_lse = _softmax_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, ref_out)
    seen = visible.any(-1).expand_as(lse)
    torch.testing.assert_close(lse[seen], ref_lse[seen])
    assert (~seen).any() and torch.isneginf(ref_lse[~seen]).all() and (out[~seen] == 0).all()
