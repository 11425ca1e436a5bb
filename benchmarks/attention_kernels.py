"""Decode attention bandwidth: our paged Triton kernel vs torch SDPA on contiguous KV vs a copy.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), bf16, one query per
sequence. Bandwidth = bytes of K and V read / time; the ceiling is a device-to-device copy of a
large tensor (bytes read + written). SDPA runs on contiguous KV of the same shapes with
`enable_gqa=True`. Times are medians of `triton.testing.do_bench` (warmed up, L2 flushed before
every call). Our KV pages are shuffled in the pool, as a serving engine's would be.
Prints the hardware, a table, and the ratios ours / copy and ours / SDPA.

    python benchmarks/attention_kernels.py [--contexts 1K,4K,16K,32K,128K,512K] [--batches 1,8,64]
                                 [--block-sizes 16,64] [--sweep] [--prefill] [--prefill-sweep]
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from infinite_llm.attention import triton as kernels
from infinite_llm.attention.reference import PagedBatch

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
GB = 1e9


def parse_sizes(text: str) -> list[int]:
    return [int(s[:-1]) * 1024 if s.endswith("K") else int(s) for s in text.split(",")]


def hardware() -> str:
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} "
            f"GiB; torch {torch.__version__}, triton {triton.__version__}")


def bench_ms(fn, rep: int = 200) -> float:
    return do_bench(fn, warmup=rep // 4, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=DTYPE, device="cuda").normal_()  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / GB


def kv_bytes(batch: int, context: int) -> int:
    return 2 * batch * context * KV_HEADS * HEAD_DIM * torch.finfo(DTYPE).bits // 8


def paged_case(batch: int, context: int, block_size: int):
    """A pool holding `batch` sequences of `context` keys in shuffled blocks, one query each."""
    blocks_per_seq = -(-context // block_size)
    shape = (batch * blocks_per_seq, block_size, KV_HEADS, HEAD_DIM)
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


def ours_ms(batch: int, context: int, block_size: int, config=None) -> float:
    q, k_cache, v_cache, paged = paged_case(batch, context, block_size)
    return bench_ms(lambda: kernels.decode_attention(q, k_cache, v_cache, paged, HEAD_DIM**-0.5,
                                                     config))


def sdpa_ms(batch: int, context: int) -> float:
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, dtype=DTYPE, device="cuda")
    k = torch.empty(batch, KV_HEADS, context, HEAD_DIM, dtype=DTYPE, device="cuda").normal_()
    v = torch.empty_like(k).normal_()
    return bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def fits(nbytes: int, limit_gb: float) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes <= limit_gb * GB and nbytes + 2 * GB < free


def main_table(args: argparse.Namespace, copy_gbs: float) -> None:
    header = (f"{'context':>8} {'batch':>5} {'KV GB':>7} {'SDPA GB/s':>10}"
              + "".join(f" {'bs' + str(b) + ' GB/s':>11} {'/copy':>6} {'/SDPA':>6}"
                        for b in args.block_sizes))
    print(header)
    for context, batch in itertools.product(args.contexts, args.batches):
        nbytes = kv_bytes(batch, context)
        if not fits(nbytes, args.max_gb):
            print(f"{context // 1024:>7}K {batch:>5} {nbytes / GB:>7.1f}  skipped (memory)")
            continue
        sdpa = nbytes / (sdpa_ms(batch, context) * 1e-3) / GB
        line = f"{context // 1024:>7}K {batch:>5} {nbytes / GB:>7.2f} {sdpa:>10.0f}"
        for block_size in args.block_sizes:
            ours = nbytes / (ours_ms(batch, context, block_size) * 1e-3) / GB
            line += f" {ours:>11.0f} {ours / copy_gbs:>6.2f} {ours / sdpa:>6.2f}"
        print(line, flush=True)
        torch.cuda.empty_cache()


def sweep(args: argparse.Namespace) -> None:
    """Bandwidth of decode configurations at a few shapes, to choose DecodeConfig's defaults."""
    shapes = [(131072, 1), (524288, 1), (32768, 8), (4096, 64)]
    configs = [kernels.DecodeConfig(block_n=n, num_warps=w, num_stages=s)
               for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))]
    configs += [kernels.DecodeConfig(splits=s) for s in (16, 32, 64, 128)]
    configs += [kernels.DecodeConfig(min_split_tokens=m) for m in (128, 512, 1024)]
    for block_size in args.block_sizes:
        for context, batch in shapes:
            nbytes = kv_bytes(batch, context)
            if fits(nbytes, args.max_gb):
                results = sweep_shape(paged_case(batch, context, block_size), nbytes, configs)
                print(f"sweep bs{block_size} context {context // 1024}K batch {batch}: "
                      + "; ".join(f"{gbs:.0f} n{c.block_n}w{c.num_warps}s{c.num_stages}"
                                  f"S{c.splits}m{c.min_split_tokens}" for gbs, c in results[:6])
                      + f" ... worst {results[-1][0]:.0f}", flush=True)
                torch.cuda.empty_cache()


def sweep_shape(case: tuple, nbytes: int, configs: list) -> list:
    """[(GB/s, config)] best first."""
    results = []
    for config in configs:
        try:
            ms = bench_ms(lambda c=config: kernels.decode_attention(*case, HEAD_DIM**-0.5, c),
                          rep=100)
        except Exception as error:  # e.g. out of shared memory: report, go on
            print(f"  {config}: {type(error).__name__}")
            continue
        results.append((nbytes / (ms * 1e-3) / GB, config))
    return sorted(results, key=lambda r: -r[0])


def prefill(block_size: int, sweep_configs: bool) -> None:
    """Causal prefill, TFLOP/s: a whole 4K and 16K prompt (ours paged, SDPA contiguous), and the
    last 8K chunk of a 64K prompt (ours; chunked prefill of a long context). With
    `sweep_configs`, also every (BLOCK_M, BLOCK_N, num_warps, num_stages) of a grid, best first."""
    from infinite_llm.attention.triton import prefill as prefill_module

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
    parser.add_argument("--max-gb", type=float, default=60.0, help="skip larger KV")
    parser.add_argument("--sweep", action="store_true", help="also sweep decode configs")
    parser.add_argument("--prefill", action="store_true", help="also time causal prefill")
    parser.add_argument("--prefill-sweep", action="store_true",
                        help="also time causal prefill and sweep its tile configs")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"hardware: {hardware()}")
    print(f"shapes: {HEADS} q heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, {DTYPE}, "
          "one query per sequence; do_bench median, L2 flushed")
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    main_table(args, copy_gbs)
    if args.prefill or args.prefill_sweep:
        prefill(args.block_sizes[0], args.prefill_sweep)
    if args.sweep:
        sweep(args)


if __name__ == "__main__":
    main()
