"""The engine on a GPU: decode steps replayed from CUDA graphs give the eager engine's tokens (and
Hugging Face's); the fused Triton model ops equal the torch path; the graph-launch variants of the
attention kernels. Skipped without CUDA. The tiny checkpoint has no tokenizer (the GPU machine
has no default model), so prompts are token ids.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import VOCAB_SIZE, write_tiny_checkpoint
from transformers import AutoModelForCausalLM

from infinite_llm import LLM, SamplingParams
from infinite_llm.attention import PAD_SLOT, reference
from infinite_llm.config import RopeScaling
from infinite_llm.kernels import attention as kernels
from infinite_llm.kernels import elementwise, linear
from infinite_llm.kvcache.paged import PagedBatch
from infinite_llm.models.layers import RMSNorm, triton_linear
from infinite_llm.models.rope import RotaryEmbedding
from infinite_llm.worker.cuda_graphs import buckets


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama-gpu"))


def _requests(seed: int, lengths: list[int]) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of the given lengths, each with its own number of new tokens, so the decode
    batch shrinks through several buckets as requests finish."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, VOCAB_SIZE) for _ in range(n)] for n in lengths]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 40), ignore_eos=True)
              for _ in lengths]
    return prompts, params


def _generate(path: Path, prompts, params, **options) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=16, num_kv_blocks=512,
              max_num_seqs=40, **options)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def test_graph_tokens_equal_eager_and_hugging_face(tiny_llama: Path) -> None:
    prompts, params = _requests(0, [random.Random(i).randint(1, 300) for i in range(37)])
    prompts += [[11] * 900, [12] * 1000]  # long rows: the decode kernel splits them
    params += [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)] * 2
    eager, eager_llm = _generate(tiny_llama, prompts, params, enforce_eager=True)
    assert eager_llm.engine.instance.runner.graphs is None
    graphed, llm = _generate(tiny_llama, prompts, params)
    assert graphed == eager
    graphs = llm.engine.instance.runner.graphs
    assert set(graphs.replays) <= set(graphs.graphs)
    assert len(graphs.graphs) > len(graphs.replays)  # all captured at start, some never used
    assert len({rows for rows, _ in graphs.replays}) >= 3, graphs.replays  # the batch shrank
    assert any(config.splits > 1 for _, config in graphs.replays), graphs.replays
    assert llm.engine.instance.runner.steps_ahead_used > 0  # async scheduling took part
    assert all(s.free == s.total for s in llm.kv_stats())
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).cuda()
    for ids, p, ours in list(zip(prompts, params, graphed))[::6]:
        out = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=p.max_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0, len(ids):].tolist() == ours


def test_decode_graphs_are_captured_at_start(tiny_llama: Path) -> None:
    """Serving replays graphs captured when the engine started: none is captured mid-run."""
    llm = LLM(str(tiny_llama), device="cuda", dtype="float32", block_size=16,
              num_kv_blocks=512, max_num_seqs=40)
    graphs = llm.engine.instance.runner.graphs
    at_start = dict(graphs.graphs)
    assert {rows for rows, _ in at_start} == set(buckets(40))
    splits = sorted(config.splits for rows, config in at_start if rows == 1)
    assert len(splits) > 1 and splits == [1 << i for i in range(len(splits))], splits
    prompts, params = _requests(1, [random.Random(i).randint(1, 900) for i in range(40)])
    llm.generate(prompts, params, use_tqdm=False)
    assert graphs.graphs == at_start
    assert len(graphs.replays) >= 3, graphs.replays


def test_async_scheduling_gives_the_same_outputs(tiny_llama: Path) -> None:
    """Decode steps queued before the host has the tokens they take give the same tokens,
    logprobs and finish reasons as steps queued after, through arrivals between steps, an
    abort, stop tokens, a length limit and seeded sampling; steps queued for requests that
    then stopped are dropped, and every block is free at the end."""
    prompts, params = _requests(2, [random.Random(i).randint(1, 200) for i in range(12)])
    plain, _ = _generate(tiny_llama, prompts, params, async_scheduling=False)
    params = [dataclasses.replace(p, stop_token_ids=[out[3]]) if i % 3 == 0 else p
              for i, (p, out) in enumerate(zip(params, plain))]  # stop on the 4th token or before
    params[1] = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True)
    params[2] = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3, ignore_eos=True)

    def run(async_scheduling: bool) -> tuple[dict[str, tuple], LLM]:
        llm = LLM(str(tiny_llama), device="cuda", dtype="float32", block_size=16,
                  num_kv_blocks=512, max_num_seqs=40, async_scheduling=async_scheduling)
        engine, outputs, step = llm.engine, {}, 0
        pending = [(str(i), prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]
        while pending or engine.has_unfinished_requests():
            if step % 5 == 0:  # two arrivals every 5 steps
                for request_id, prompt, p in pending[:2]:
                    engine.add_request(prompt, p, request_id)
                    outputs[request_id] = engine.outputs[request_id]  # updated in place
                pending = pending[2:]
            if step == 12:
                engine.abort_request("5")
            engine.step()
            step += 1
        assert all(s.free == s.total for s in llm.kv_stats())
        return {i: (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].logprobs)
                for i, o in outputs.items()}, llm

    expected, _ = run(False)
    got, llm = run(True)
    assert got == expected
    assert {finish for _, finish, _ in got.values()} == {"stop", "length", "abort"}
    runner = llm.engine.instance.runner
    assert 0 < runner.steps_ahead_used < runner.steps_ahead  # some were dropped


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                  reason="NCCL needs a GPU per rank")),
])
def test_kv_split_over_two_instances(tiny_llama: Path, backend: str) -> None:
    """DistAttention's GPU path (Triton partials where the KV lives, the merge on the owner): a
    request longer than one instance's pool, next to short ones, gives the one-instance tokens.
    gloo puts both instances on one GPU (NCCL refuses two ranks on one GPU); NCCL, the default
    on CUDA, puts them on two GPUs."""
    prompts, params = _requests(1, [900, 300, 5, 40])  # 900 + up to 40 > 48 blocks x 16
    single, _ = _generate(tiny_llama, prompts, params)
    llm = LLM(str(tiny_llama), device="cuda", dtype="float32", block_size=16, num_kv_blocks=48,
              num_instances=2, data_backend=backend)
    try:
        engine = llm.engine
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(prompt, p, str(i))
        tokens: dict[str, list[int]] = {}
        lent = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] = out.outputs[0].token_ids
            lent = max(lent, sum(s.lent for s in llm.kv_stats()))
        assert [tokens[str(i)] for i in range(len(prompts))] == single
        assert lent > 0
        assert all(s.free == s.total for s in llm.kv_stats())
    finally:
        llm.shutdown()


def test_buckets() -> None:
    assert buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert buckets(3) == [1, 2, 3]


@pytest.mark.parametrize("splits", [1, 2, 8, 64])
def test_split_per_row_decode_matches_reference(splits: int) -> None:
    """The graph launch: each row divides its own keys over a fixed split count; rows with no
    keys (the padding of a bucket) give lse -inf; q may be a strided view of a fused QKV."""
    gen = torch.Generator().manual_seed(splits)
    rows, heads, kv_heads, dim, page = 9, 8, 2, 64, 16
    lens = [1, 17, 300, 0, 2048, 64, 5, 0, 999]
    tables = []
    free = torch.randperm(sum(-(-n // page) for n in lens) + 1, generator=gen).tolist()
    for n in lens:
        tables.append([free.pop() for _ in range(-(-n // page))])
    width = max(len(t) for t in tables)
    k_cache = torch.randn(len(free) + sum(map(len, tables)), page, kv_heads, dim, generator=gen)
    v_cache = torch.randn(k_cache.shape, generator=gen)
    batch = PagedBatch(
        cu_q_lens=torch.arange(rows + 1).cuda(),
        q_positions=torch.tensor([max(n - 1, 0) for n in lens]).cuda(),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32).cuda(),
        kv_starts=torch.zeros(rows, dtype=torch.long).cuda(),
        kv_lens=torch.tensor(lens).cuda(), q_lens=[1] * rows, kv_lens_host=lens)
    fused_qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen)
    q = fused_qkv[:, : heads * dim].view(rows, heads, dim)  # rows strided, as in the model
    config = kernels.DecodeConfig(splits=splits, split_per_row=True)
    out, lse = kernels.decode_attention(fused_qkv.cuda().half()[:, : heads * dim].view(q.shape),
                                        k_cache.cuda().half(),
                                        v_cache.cuda().half(), batch, dim**-0.5, config)
    ref_out, ref_lse = reference.paged_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), batch,
                                                 dim**-0.5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-3, rtol=0)
    torch.testing.assert_close(out.float(), ref_out, atol=3e-3, rtol=3e-3)


def test_negative_slots_store_nothing() -> None:
    cache = torch.randn(2, 4, 16, 2, 64, device="cuda")
    before = cache.clone()
    k = torch.randn(3, 2, 64, device="cuda")
    slots = torch.tensor([PAD_SLOT, 5, PAD_SLOT], device="cuda")
    kernels.store_kv(cache[0], cache[1], slots, k, k)
    before[0].view(-1, 2, 64)[5] = k[1]
    before[1].view(-1, 2, 64)[5] = k[1]
    assert torch.equal(cache, before)


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_ops_equal_torch_path(dtype: torch.dtype) -> None:
    """Each fused op on the GPU against the module's torch code on the CPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 576, generator=gen).to(dtype)
    norm = RMSNorm(576, 1e-5, dtype, torch.device("cpu"))
    norm.weight.data = torch.randn(576, generator=gen).to(dtype)
    out = elementwise.rms_norm(x.cuda(), norm.weight.cuda(), 1e-5)
    torch.testing.assert_close(out.cpu(), norm(x), atol=TOL[dtype], rtol=TOL[dtype])
    residual = torch.randn(37, 576, generator=gen).to(dtype)
    residual_gpu = residual.cuda()
    out = elementwise.add_rms_norm(x.cuda(), residual_gpu, norm.weight.cuda(), 1e-5)
    ref = norm.add(x, residual)  # adds in place, like the kernel
    assert torch.equal(residual_gpu.cpu(), residual)  # the stream rounds as torch's add does
    torch.testing.assert_close(out.cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])

    rope = RotaryEmbedding(64, 500000.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 64), 4096)
    positions = torch.randint(0, 4096, (37,), generator=gen)
    qkv = torch.randn(37, (8 + 2 + 2) * 64, generator=gen).to(dtype)
    q, k = qkv[:, :512].view(37, 8, 64), qkv[:, 512:640].view(37, 2, 64)  # strided views
    ref_q, ref_k = rope(positions, q, k)
    qkv_gpu = qkv.cuda()
    q_gpu, k_gpu = qkv_gpu[:, :512].view(37, 8, 64), qkv_gpu[:, 512:640].view(37, 2, 64)
    elementwise.rotary_(positions.cuda(), q_gpu, k_gpu, rope.cos.cuda(), rope.sin.cuda())
    torch.testing.assert_close(q_gpu.cpu(), ref_q, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k_gpu.cpu(), ref_k, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv_gpu[:, 640:].cpu(), qkv[:, 640:])  # v untouched

    gate_up = torch.randn(37, 2 * 1536, generator=gen).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(elementwise.silu_mul(gate_up.cuda()).cpu(), ref, atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 40, 64])
def test_skinny_linears_equal_cublas(dtype: torch.dtype, rows: int) -> None:
    """1-64 row linears (the GEMV; the split-K kernel with 1, 2 and 4 splits; the tile kernel up
    to 16 rows) against cuBLAS: Llama-3-8B's QKV and down shapes, a ragged N with a bias
    (Qwen2's QKV has one), a narrow N; x rows of a wider tensor (a view). `triton_linear` (the
    Triton backend of the model's Linear) sends the product where `splitk_tiles` says."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    tol = dict(atol=2e-2, rtol=1.6e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=1e-3)
    for n, k, with_bias in [(6144, 4096, False), (4096, 14336, False), (1000, 1024, True),
                            (37, 512, False)]:
        x = torch.randn(rows + 2, k, device="cuda", generator=gen, dtype=dtype)[1:rows + 1]
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=dtype) / k**0.5
        b = torch.randn(n, device="cuda", generator=gen, dtype=dtype) if with_bias else None
        expected = torch.nn.functional.linear(x, w, b)
        assert linear.skinny_fits(x, w)
        torch.testing.assert_close(triton_linear(x, w, b), expected, **tol)
        if rows == 1:
            ours = [linear.gemv(x, w, b)]
        else:
            ours = [linear.splitk_linear(x, w, b, split_k=split) for split in (1, 2, 4, 2)]
            if rows <= linear.SKINNY_MAX_ROWS:
                ours.append(linear.skinny_linear(x, w, b))
        for y in ours:
            torch.testing.assert_close(y, expected, **tol)
    if rows > 1:
        assert not linear._tile_counters(x.device, 1).any()  # every launch left them at zero
        # Replays of a captured split-K launch read this replay's partials, not the last one's.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = linear.splitk_linear(x, w, b, split_k=4)
        for _ in range(3):
            x.copy_(torch.randn(x.shape, device="cuda", generator=gen, dtype=dtype))
            graph.replay()
            torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), **tol)
    w = torch.empty(8, 512, device="cuda", dtype=dtype)
    assert not linear.skinny_fits(torch.empty(65, 512, device="cuda", dtype=dtype), w)  # rows
    assert not linear.skinny_fits(torch.empty(1, 512, device="cuda"), w.float())  # float32
    assert not linear.skinny_fits(torch.empty(1, 576, device="cuda", dtype=dtype),
                                 torch.empty(8, 576, device="cuda", dtype=dtype))  # width
