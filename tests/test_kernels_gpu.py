"""Every Triton attention kernel against the torch reference, computed in float32.

Runs on a CUDA GPU with triton; skipped elsewhere. With TRITON_INTERPRET=1 (and triton installed)
the same tests run on the CPU through Triton's interpreter, slowly, which is how the kernels are
debugged without a GPU. Cases cover block sizes 16/64, head_dim 64/128, GQA groups 1/4/8, decode
(split-K) and chunked prefill, KV split into segments with kv_start > 0, rows whose queries see
no key, and bf16/fp16/fp32.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
from dataclasses import dataclass

import pytest
import torch

from infinite_llm.attention import attention_ops, reference
from infinite_llm.kvcache.paged import PagedBatch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1)", allow_module_level=True)

from infinite_llm.kernels import attention as kernels

INTERPRET = DEVICE == "cpu"
# (max |err| tolerance on out, on lse, max relative norm error on out) per dtype.
TOLERANCES = {
    torch.bfloat16: (2e-2, 2e-3, 1e-2),
    torch.float16: (3e-3, 2e-3, 2e-3),
    torch.float32: (2e-4, 2e-4, 1e-4),
}


@dataclass
class Case:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    batch: PagedBatch
    row_seq: list[int]  # sequence of each row
    seq_kv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (k, v, q_positions) per seq


def _poison() -> None:
    """Leave NaNs in the caching allocator's free memory, so an unwritten output shows."""
    if DEVICE == "cuda":
        torch.full((1 << 24,), float("nan"), device=DEVICE)


def _make_case(
    rng: random.Random,
    *,
    dtype: torch.dtype,
    block_size: int,
    head_dim: int,
    group: int,
    decode: bool,
    num_kv_heads: int = 2,
    max_len: int = 1200,
    min_len: int = 1,
    max_seqs: int = 5,
) -> Case:
    """Random sequences, each split into 1-4 segments (one row each), plus rows that see nothing.

    Decode: one query at the sequence's last position. Prefill: a chunk of queries placed anywhere
    in the KV (keys after it are masked), some chunks of length 1 (decodes mixed in)."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    num_heads = num_kv_heads * group
    rows: list[tuple[int, int, int, bool]] = []  # (seq, kv_start, kv_len, holds the seq's keys)
    seq_kv = []
    for seq in range(rng.randint(1, max_seqs)):
        length = rng.randint(min_len, max_len)
        k = torch.randn(length, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(length, num_kv_heads, head_dim, generator=gen)
        if decode:
            q_pos = torch.tensor([length - 1])
        else:
            q_len = rng.choice([1, rng.randint(1, min(length, 200))])
            first = rng.randint(0, length - q_len)
            q_pos = torch.arange(first, first + q_len)
        seq_kv.append((k, v, q_pos))
        cuts = sorted(rng.sample(range(1, length), min(length - 1, rng.randint(0, 3))))
        bounds = [0, *cuts, length]
        rows += [(seq, lo, hi - lo, True) for lo, hi in itertools.pairwise(bounds)]
        if rng.random() < 0.4:  # a segment past the queries, or an empty one: nothing visible
            rows.append((seq, int(q_pos[-1]) + 1, rng.choice([0, 5]), False))
    rng.shuffle(rows)
    num_blocks = sum(-(-n // block_size) for _, _, n, _ in rows) + 4
    free = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    tables, qs, positions = [], [], []
    for seq, lo, n, real in rows:
        k, v, q_pos = seq_kv[seq]
        blocks = [free.pop() for _ in range(-(-n // block_size))]
        slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size
                              for i in range(n)], dtype=torch.long)
        if real:
            reference.store_kv(k_cache, v_cache, slots, k[lo : lo + n], v[lo : lo + n])
        else:  # random keys that must stay invisible
            reference.store_kv(k_cache, v_cache, slots, torch.randn(n, num_kv_heads, head_dim),
                               torch.randn(n, num_kv_heads, head_dim))
        tables.append(blocks)
        qs.append(torch.randn(len(q_pos), num_heads, head_dim, generator=gen))
        positions.append(q_pos)
    # Rows of one sequence share its queries: give them the same q.
    first_q: dict[int, torch.Tensor] = {}
    for i, (seq, _, _, _) in enumerate(rows):
        qs[i] = first_q.setdefault(seq, qs[i])
    width = max([len(t) for t in tables] + [1])
    q_lens = [len(p) for p in positions]
    kv_lens = [n for _, _, n, _ in rows]
    batch = PagedBatch(
        cu_q_lens=torch.tensor([0, *q_lens]).cumsum(0).to(DEVICE),
        q_positions=torch.cat(positions).to(DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32).to(DEVICE),
        kv_starts=torch.tensor([lo for _, lo, _, _ in rows]).to(DEVICE),
        kv_lens=torch.tensor(kv_lens).to(DEVICE),
        q_lens=q_lens,
        kv_lens_host=kv_lens,
    )
    return Case(torch.cat(qs).to(DEVICE, dtype), k_cache.to(DEVICE, dtype),
                v_cache.to(DEVICE, dtype), batch, [s for s, _, _, _ in rows], seq_kv)


def _reference(case: Case, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.paged_attention(case.q.float(), case.k_cache.float(), case.v_cache.float(),
                                     case.batch, scale)


def _check(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor,
           dtype: torch.dtype) -> None:
    out_tol, lse_tol, rel_tol = TOLERANCES[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "-inf rows differ"
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=lse_tol, rtol=0)
    torch.testing.assert_close(out.float(), ref_out, atol=out_tol, rtol=out_tol)
    rel = (out.float() - ref_out).norm() / ref_out.norm().clamp_min(1e-6)
    assert rel < rel_tol, f"relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_paged_attention_matches_reference(dtype, block_size, head_dim, group, decode) -> None:
    rng = random.Random(f"{dtype}-{block_size}-{head_dim}-{group}-{decode}")
    for _ in range(1 if INTERPRET else 3):
        case = _make_case(rng, dtype=dtype, block_size=block_size, head_dim=head_dim,
                          group=group, decode=decode, max_len=600 if INTERPRET else 2500)
        scale = head_dim**-0.5
        _poison()
        out, lse = kernels.paged_attention(case.q, case.k_cache, case.v_cache, case.batch, scale)
        _check(out, lse, *_reference(case, scale), dtype)


def _head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same [blocks, block_size, kv_heads, head_dim] values, stored with each head's keys of
    a block contiguous ([blocks, kv_heads, block_size, head_dim] in memory)."""
    return cache.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_kernels_follow_the_cache_strides(block_size: int, decode: bool) -> None:
    """Attention and the KV store read the cache through its strides: a head-major cache gives
    the reference's results too."""
    rng = random.Random(block_size + decode)
    case = _make_case(rng, dtype=torch.bfloat16, block_size=block_size, head_dim=128, group=4,
                      decode=decode, num_kv_heads=4)
    k_cache, v_cache = _head_major(case.k_cache), _head_major(case.v_cache)
    assert not k_cache.is_contiguous()
    out, lse = kernels.paged_attention(case.q, k_cache, v_cache, case.batch, 0.088)
    _check(out, lse, *_reference(case, 0.088), torch.bfloat16)
    slots = torch.randperm(k_cache.shape[0] * block_size)[:50].to(DEVICE)
    new_k, new_v = torch.randn(2, 50, 4, 128, device=DEVICE, dtype=torch.bfloat16)
    kernels.store_kv(k_cache, v_cache, slots, new_k, new_v)
    reference.store_kv(case.k_cache, case.v_cache, slots, new_k, new_v)
    assert torch.equal(k_cache, case.k_cache) and torch.equal(v_cache, case.v_cache)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_prefill_kernel_on_decode_rows_and_float32(dtype, decode) -> None:
    """The prefill kernel also serves batches of decodes (mixed steps); float32 caches work."""
    rng = random.Random(7)
    case = _make_case(rng, dtype=dtype, block_size=16, head_dim=128, group=4, decode=decode,
                      max_len=500)
    out, lse = kernels.prefill_attention(case.q, case.k_cache, case.v_cache, case.batch, 0.1)
    _check(out, lse, *_reference(case, 0.1), dtype)


@pytest.mark.parametrize("min_split_tokens", [64, 256])
def test_decode_many_splits(min_split_tokens: int) -> None:
    """Forced splits, some past their row's end (lse -inf partials), reduce exactly."""
    rng = random.Random(min_split_tokens)
    case = _make_case(rng, dtype=torch.float16, block_size=16, head_dim=128, group=8,
                      decode=True, num_kv_heads=1, max_len=1500, max_seqs=8)
    config = kernels.DecodeConfig(splits=1000, min_split_tokens=min_split_tokens)
    _poison()
    out, lse = kernels.decode_attention(case.q, case.k_cache, case.v_cache, case.batch, 0.09,
                                        config)
    _check(out, lse, *_reference(case, 0.09), torch.float16)


@pytest.mark.skipif(INTERPRET, reason="too slow for the interpreter")
@pytest.mark.parametrize("block_size", [16, 64])
def test_long_context_decode(block_size: int) -> None:
    """A 40K context, Llama-3-8B heads: many splits and a long block table."""
    rng = random.Random(block_size)
    case = _make_case(rng, dtype=torch.bfloat16, block_size=block_size, head_dim=128, group=4,
                      decode=True, num_kv_heads=8, min_len=30_000, max_len=40_000,
                      max_seqs=2)
    out, lse = kernels.paged_attention(case.q, case.k_cache, case.v_cache, case.batch, 0.088)
    _check(out, lse, *_reference(case, 0.088), torch.bfloat16)


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_segments_merge_to_causal_attention(decode: bool) -> None:
    """DistAttention's invariant on the GPU path: kernel partials over each segment, merged by
    the merge kernel, equal causal attention over the whole sequence."""
    rng = random.Random(11)
    dtype = torch.float16
    case = _make_case(rng, dtype=dtype, block_size=16, head_dim=64, group=4, decode=decode)
    out, lse = kernels.paged_attention(case.q, case.k_cache, case.v_cache, case.batch, 0.125)
    cu = case.batch.cu_q_lens.tolist()
    for seq, (k, v, q_pos) in enumerate(case.seq_kv):
        rows = [r for r, s in enumerate(case.row_seq) if s == seq]
        o_seq, lse_seq = kernels.merge(torch.stack([out[cu[r] : cu[r + 1]] for r in rows]),
                                       torch.stack([lse[cu[r] : cu[r + 1]] for r in rows]))
        q = case.q[cu[rows[0]] : cu[rows[0] + 1]].float().cpu()
        mask = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]
        k16 = k.to(dtype).float().repeat_interleave(4, dim=1).transpose(0, 1)
        v16 = v.to(dtype).float().repeat_interleave(4, dim=1).transpose(0, 1)
        scores = (q.transpose(0, 1) @ k16.transpose(1, 2) * 0.125).masked_fill(~mask, -torch.inf)
        expected = (scores.softmax(-1) @ v16).transpose(0, 1)
        torch.testing.assert_close(o_seq.float().cpu(), expected, atol=3e-3, rtol=3e-3)
        torch.testing.assert_close(lse_seq.cpu(), scores.logsumexp(-1).T, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("num_partials", [1, 3, 9])
def test_merge_matches_reference(dtype: torch.dtype, num_partials: int) -> None:
    gen = torch.Generator().manual_seed(num_partials)
    outs = torch.randn(num_partials, 37, 6, 128, generator=gen).to(DEVICE, dtype)
    lses = torch.randn(num_partials, 37, 6, generator=gen) * 4
    lses[torch.rand(lses.shape, generator=gen) < 0.3] = float("-inf")
    lses[:, 5] = float("-inf")  # token 5 seen by no partial
    lses = lses.to(DEVICE)
    _poison()
    out, lse = kernels.merge(outs, lses)
    ref_out, ref_lse = reference.merge(outs.float(), lses)
    _check(out, lse, ref_out, ref_lse, dtype)
    assert torch.all(out[5] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("block_size", [16, 64])
def test_store_kv_matches_reference(dtype: torch.dtype, block_size: int) -> None:
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, kv_heads, head_dim, tokens = 12, 8, 128, 100
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    cache = cache.to(DEVICE, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    fused = torch.randn(tokens, 3 * kv_heads * head_dim, generator=gen).to(DEVICE)  # float32
    k = fused[:, : kv_heads * head_dim].view(tokens, kv_heads, head_dim)  # strided views
    v = fused[:, 2 * kv_heads * head_dim :].view(tokens, kv_heads, head_dim)
    expected = cache.clone()
    reference.store_kv(expected[0], expected[1], slots, k, v)
    kernels.store_kv(cache[0], cache[1], slots, k, v)
    if INTERPRET and dtype == torch.bfloat16:  # the interpreter rounds float32 -> bf16 its own way
        torch.testing.assert_close(cache, expected)
    else:
        assert torch.equal(cache, expected)


@pytest.mark.skipif(INTERPRET, reason="the selector picks triton on CUDA only")
def test_attention_ops_selects_triton_on_cuda() -> None:
    assert attention_ops(torch.device("cuda")).paged_attention is kernels.paged_attention
    assert attention_ops("cpu").paged_attention is reference.paged_attention
