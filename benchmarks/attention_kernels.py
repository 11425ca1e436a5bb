"""Decode attention bandwidth: our paged Triton kernel vs torch SDPA on contiguous KV vs a copy.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16, one query per
sequence. Bandwidth = bytes of K and V read / time; the ceiling is a device-to-device copy of a
large tensor (bytes read + written). SDPA runs on contiguous KV of the same shapes with
`enable_gqa=True`. Our KV pages are shuffled in the pool, as a serving engine's would be.
Prints the hardware, a table, and the ratios ours / copy and ours / SDPA.

Decode is timed as the engine runs it (`--timing graph`, the default): inside one CUDA graph
that calls the kernel on L copies of the KV one after another, like the layers of a decode step
(L copies make at least 1 GB, so the L2 cache holds none of a call's KV), with the launch shape
the engine's graphs use (`graph_decode_config`: a power-of-two split count, each row splitting its
own keys). SDPA is timed the same way. The time per call is the median replay / L. With
`--timing eager`, each call is timed alone by `triton.testing.do_bench` (L2 flushed before
every call), host launch time included: that is what short contexts measured before.

    python benchmarks/attention_kernels.py [--contexts 1K,4K,16K,32K,128K,512K] [--batches 1,8,64]
                                 [--block-sizes 16,64] [--timing graph|eager] [--sweep]
                                 [--prefill] [--prefill-sweep]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from infinite_llm.attention import graph_decode_config, graph_decode_ops
from infinite_llm.kernels import attention as kernels
from infinite_llm.kernels.common import pdl_args
from infinite_llm.kvcache.paged import PagedBatch

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
GB = 1e9


def parse_sizes(text: str) -> list[int]:
    return [int(s[:-1]) * 1024 if s.endswith("K") else int(s) for s in text.split(",")]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"1Kx16,128Kx1" -> [(1024, 16), (131072, 1)]."""
    return [(parse_sizes(c)[0], int(b)) for c, b in (s.split("x") for s in text.split(","))]


def hardware() -> str:
    props = torch.cuda.get_device_properties(0)
    pdl = "on" if pdl_args(torch.device("cuda", 0))["PDL"] else "off"
    return (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} "
            f"GiB; torch {torch.__version__}, triton {triton.__version__}; programmatic "
            f"dependent launch {pdl}")


def bench_ms(fn, rep: int = 200) -> float:
    return do_bench(fn, warmup=rep // 4, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=DTYPE, device="cuda").normal_()  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / GB


def kv_bytes(batch: int, context: int) -> int:
    return 2 * batch * context * KV_HEADS * HEAD_DIM * torch.finfo(DTYPE).bits // 8


def paged_case(batch: int, context: int, block_size: int, layout: str = "token"):
    """A pool holding `batch` sequences of `context` keys in shuffled blocks, one query each.
    `layout` "token": a block is [block_size, KV_HEADS, HEAD_DIM] in memory; "head": [KV_HEADS,
    block_size, HEAD_DIM] (each head's keys of a block contiguous), seen through the same
    [blocks, block_size, KV_HEADS, HEAD_DIM] view."""
    blocks_per_seq = -(-context // block_size)
    shape = (batch * blocks_per_seq, block_size, KV_HEADS, HEAD_DIM)
    if layout == "head":
        stored = (shape[0], KV_HEADS, block_size, HEAD_DIM)
        k_cache = torch.empty(stored, dtype=DTYPE, device="cuda").normal_().transpose(1, 2)
        v_cache = torch.empty(stored, dtype=DTYPE, device="cuda").normal_().transpose(1, 2)
    else:
        k_cache = torch.empty(shape, dtype=DTYPE, device="cuda").normal_()
        v_cache = torch.empty(shape, dtype=DTYPE, device="cuda").normal_()
    table = torch.randperm(shape[0], device="cuda", dtype=torch.int32).view(batch, -1)
    paged = PagedBatch(
        cu_q_lens=torch.arange(batch + 1, device="cuda"),
        q_positions=torch.full((batch,), context - 1, device="cuda"),
        block_tables=table,
        kv_starts=torch.zeros(batch, dtype=torch.long, device="cuda"),
        kv_lens=torch.full((batch,), context, device="cuda"),
        q_lens=[1] * batch,
        kv_lens_host=[context] * batch,
    )
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    return q, k_cache, v_cache, paged


def graph_ms(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Milliseconds per call when `calls` run back to back in one CUDA graph (median replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capturing stream: compiles the kernels
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / len(calls)


def layers(nbytes: int) -> int:
    """Copies of the KV per graph: at least 1 GB in all, at most 64."""
    return max(1, min(64, -(-int(GB) // nbytes)))


def ours_ms(batch: int, context: int, block_size: int, timing: str, layout: str = "token",
            config: kernels.DecodeConfig | None = None) -> float:
    """Our decode kernel; `config` None: the launch the engine's graphs use for this shape."""
    scale = HEAD_DIM**-0.5
    if timing == "eager":
        q, k_cache, v_cache, paged = paged_case(batch, context, block_size, layout)
        return bench_ms(lambda: kernels.decode_attention(q, k_cache, v_cache, paged, scale,
                                                         config))
    cases = [paged_case(batch, context, block_size, layout)
             for _ in range(layers(kv_bytes(batch, context)))]
    if config is None:
        q, k_cache = cases[0][:2]
        attend = graph_decode_ops(graph_decode_config(q, k_cache, context)).paged_attention
    else:
        attend = partial(kernels.decode_attention, config=config)
    return graph_ms([partial(attend, *case, scale) for case in cases])


def sdpa_ms(batch: int, context: int, timing: str) -> float:
    def case() -> tuple:
        q = torch.randn(batch, HEADS, 1, HEAD_DIM, dtype=DTYPE, device="cuda")
        k = torch.empty(batch, KV_HEADS, context, HEAD_DIM, dtype=DTYPE, device="cuda").normal_()
        return q, k, torch.empty_like(k).normal_()

    sdpa = partial(F.scaled_dot_product_attention, enable_gqa=True)
    if timing == "eager":
        return bench_ms(partial(sdpa, *case()))
    return graph_ms([partial(sdpa, *case()) for _ in range(layers(kv_bytes(batch, context)))])


def fits(nbytes: int, limit_gb: float) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes <= limit_gb * GB and nbytes + 2 * GB < free


def column_name(block_size: int, layout: str, layouts: list[str]) -> str:
    """"bs16", or "bs16 head" when more than one layout is timed."""
    return f"bs{block_size}" + (f" {layout}" if len(layouts) > 1 else "")


def main_table(args: argparse.Namespace, copy_gbs: float) -> None:
    columns = list(itertools.product(args.block_sizes, args.layouts))
    header = (f"{'context':>8} {'batch':>5} {'KV GB':>7} {'SDPA GB/s':>10}"
              + "".join(f" {column_name(b, layout, args.layouts) + ' GB/s':>11} {'/copy':>6}"
                        f" {'/SDPA':>6}" for b, layout in columns))
    print(header)
    for context, batch in itertools.product(args.contexts, args.batches):
        nbytes = kv_bytes(batch, context)
        if not fits(nbytes, args.max_gb):
            print(f"{context // 1024:>7}K {batch:>5} {nbytes / GB:>7.1f}  skipped (memory)")
            continue
        sdpa = nbytes / (sdpa_ms(batch, context, args.timing) * 1e-3) / GB
        line = f"{context // 1024:>7}K {batch:>5} {nbytes / GB:>7.2f} {sdpa:>10.0f}"
        for block_size, layout in columns:
            ours = nbytes / (ours_ms(batch, context, block_size, args.timing, layout)
                             * 1e-3) / GB
            line += f" {ours:>11.0f} {ours / copy_gbs:>6.2f} {ours / sdpa:>6.2f}"
        print(line, flush=True)
        torch.cuda.empty_cache()


def sweep(args: argparse.Namespace) -> None:
    """Bandwidth of graph decode launches (tiles x split counts, each row splitting its own keys)
    at the engine's common shapes, timed in graphs, to choose the engine's defaults."""
    shapes = args.sweep_shapes
    tiles = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))
    for (block_size, layout), (context, batch) in itertools.product(
            itertools.product(args.block_sizes, args.layouts), shapes):
        nbytes = kv_bytes(batch, context)
        if not fits(layers(nbytes) * nbytes, args.max_gb):
            continue
        cases = [paged_case(batch, context, block_size, layout)
                 for _ in range(layers(nbytes))]
        q, k_cache = cases[0][:2]
        shipped = graph_decode_config(q, k_cache, context)
        results = []
        for (n, w, st), splits in itertools.product(tiles, (1, 2, 4, 8, 16, 32, 64, 128)):
            if splits * n > context:
                continue
            config = kernels.DecodeConfig(block_n=n, num_warps=w, num_stages=st,
                                          splits=splits, split_per_row=True)
            try:
                ms = graph_ms([partial(kernels.decode_attention, *case, HEAD_DIM**-0.5,
                                       config) for case in cases], replays=10)
            except Exception as error:  # e.g. out of shared memory: report, go on
                print(f"  {config}: {type(error).__name__}")
                continue
            results.append((nbytes / (ms * 1e-3) / GB, (n, w, st, splits)))
        results.sort(reverse=True)
        mine = (shipped.block_n, shipped.num_warps, shipped.num_stages, shipped.splits)
        engine_gbs = dict((c, g) for g, c in results).get(mine, 0)
        print(f"sweep {column_name(block_size, layout, args.layouts)} {context // 1024}K x "
              f"{batch} (block_n, warps, stages, splits): engine {mine} {engine_gbs:.0f} "
              f"GB/s; best " + ", ".join(f"{c} {g:.0f}" for g, c in results[:6])
              + f"; worst {results[-1][0]:.0f}", flush=True)
        del cases
        torch.cuda.empty_cache()


def prefill(block_size: int, sweep_configs: bool) -> None:
    """Causal prefill, TFLOP/s: a whole 4K and 16K prompt (ours paged, SDPA contiguous), and the
    last 8K chunk of a 64K prompt (ours; chunked prefill of a long context). With
    `sweep_configs`, also every (BLOCK_M, BLOCK_N, num_warps, num_stages) of a grid, best first."""
    from infinite_llm.kernels import prefill as prefill_module

    cases = []
    for length, chunk in ((4096, 4096), (16384, 16384), (65536, 8192)):
        _, k_cache, v_cache, paged = paged_case(1, length, block_size)
        q = torch.randn(chunk, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        paged.cu_q_lens = torch.tensor([0, chunk], device="cuda")
        paged.q_positions = torch.arange(length - chunk, length, device="cuda")
        paged.q_lens = [chunk]
        flops = 2 * 2 * HEADS * HEAD_DIM * chunk * (length - chunk / 2)
        name = f"{length // 1024}K" + ("" if chunk == length else f", last {chunk // 1024}K")
        ours = bench_ms(partial(kernels.paged_attention, q, k_cache, v_cache, paged, 0.088))
        line = f"prefill {name} causal, bs{block_size}: ours {flops / ours * 1e-9:.0f} TFLOP/s"
        if chunk == length:
            qs = q.transpose(0, 1)[None]
            ks = torch.randn(1, KV_HEADS, length, HEAD_DIM, dtype=DTYPE, device="cuda")
            sdpa = bench_ms(partial(F.scaled_dot_product_attention, qs, ks, ks, is_causal=True,
                                    enable_gqa=True))
            line += f", SDPA {flops / sdpa * 1e-9:.0f} TFLOP/s, ours/SDPA {sdpa / ours:.2f}"
        print(line, flush=True)
        cases.append((name, (q, k_cache, v_cache, paged, 0.088), flops))
    if not sweep_configs:
        return
    shipped = prefill_module._config
    results: dict[str, list] = {name: [] for name, _, _ in cases}
    try:
        for config in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            prefill_module._config = lambda head_dim, size, c=config: c
            for name, args, flops in cases:
                ms = bench_ms(partial(kernels.paged_attention, *args), rep=100)
                results[name].append((flops / ms * 1e-9, config))
    finally:
        prefill_module._config = shipped
    print(f"prefill configs (BLOCK_M, BLOCK_N, warps, stages), shipped {shipped(HEAD_DIM, 2)}:")
    for name, rows in results.items():
        rows.sort(reverse=True)
        print(f"  {name}: " + ", ".join(f"{c} {t:.0f}" for t, c in rows[:6]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=parse_sizes, default="1K,4K,16K,32K,128K,512K")
    parser.add_argument("--batches", type=parse_sizes, default="1,8,64")
    parser.add_argument("--block-sizes", type=parse_sizes, default="16,64")
    parser.add_argument("--layouts", type=lambda text: text.split(","), default=["token"],
                        help="KV page layouts: token (the engine's), head, or token,head")
    parser.add_argument("--max-gb", type=float, default=60.0, help="skip larger KV")
    parser.add_argument("--timing", choices=("graph", "eager"), default="graph")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep graph decode launches (tiles x splits)")
    parser.add_argument("--sweep-shapes", type=parse_shapes,
                        default=parse_shapes("1Kx16,1Kx64,1Kx256,8Kx16,32Kx1,128Kx1"),
                        help="CONTEXTxBATCH,... for --sweep")
    parser.add_argument("--prefill", action="store_true", help="also time causal prefill")
    parser.add_argument("--prefill-sweep", action="store_true",
                        help="also time causal prefill and sweep its tile configs")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"hardware: {hardware()}")
    how = ("in CUDA graphs of L calls over distinct KV (>= 1 GB), median replay / L"
           if args.timing == "graph" else "do_bench median, L2 flushed")
    print(f"shapes: {HEADS} q heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, {DTYPE}, "
          f"one query per sequence; timed {how}")
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    main_table(args, copy_gbs)
    if args.prefill or args.prefill_sweep:
        prefill(args.block_sizes[0], args.prefill_sweep)
    if args.sweep:
        sweep(args)


if __name__ == "__main__":
    main()
