"""One-row linears: the Triton GEMV (`infinite_llm/kernels/linear.py`) vs cuBLAS (`F.linear`).

Llama-3-8B's weight matrices (bf16): the fused QKV, o_proj, the fused gate/up, down_proj and the
lm_head, times one row of activations: every linear of a decode step at batch 1. Such a
product is a read of the weights, so bandwidth = weight bytes / time, against a
device-to-device copy of a large tensor (bytes read + written) measured in the same run. Times
are medians of `triton.testing.do_bench` (L2 flushed before every call, as the other 31 layers'
weights flush it in a real step). Prints the hardware, a table and the ratio cuBLAS / ours.

    python benchmarks/linears.py     (not `python -P`: it imports attention_kernels)

`--step 16,64` times instead a whole decode step's linears at those row counts, as the engine
runs them: one CUDA graph of 32 layers' QKV, o_proj, gate/up and down (distinct weights, 14 GB)
and the lm_head, cuBLAS against the Triton skinny GEMM (`kernels.skinny_linear`) over a sweep of
its tiles (block_n, block_k, stages, warps); median replay time.

`--matrices 16,32,64` times each matrix on its own (its 32 distinct weights back to back in one
CUDA graph, the lm_head once): cuBLAS against the split-K kernel (`kernels.splitk_linear`) over a
sweep of its tiles and split counts, and the tile kernel up to 16 rows; what `kernels.splitk_tiles`
was chosen from.
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch
import torch.nn.functional as F
from attention_kernels import bench_ms, copy_bandwidth, graph_ms, hardware, parse_sizes

from infinite_llm.kernels import linear as kernels

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}  # (out, in) of Llama-3-8B
GB = 1e9


def step_ms(fn, xs: dict[int, torch.Tensor], layers: list[list[torch.Tensor]],
            head: torch.Tensor) -> float:
    """A step's linears through `fn(x, w)` in one CUDA graph: median replay time."""
    calls = [partial(fn, xs[w.shape[1]], w) for ws in layers for w in ws]
    calls.append(partial(fn, xs[head.shape[1]], head))
    return graph_ms(calls) * len(calls)


def step_table(rows_list: list[int], copy: float) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [v for k, v in SHAPES.items() if k != "lm_head"]
    layers = [[torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
               for n, k in shapes] for _ in range(32)]
    head = torch.randn(*SHAPES["lm_head"], device="cuda", generator=gen,
                       dtype=torch.bfloat16) / 64
    gb = (sum(w.numel() for ws in layers for w in ws) + head.numel()) * 2 / GB
    print(f"a step's linears: {gb:.2f} GB of weights; roofline at copy bandwidth "
          f"{gb / copy * 1e3:.2f} ms")
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, device="cuda", generator=gen, dtype=torch.bfloat16)
              for k in {w.shape[1] for w in layers[0]} | {head.shape[1]}}
        for w in (layers[0][0], layers[0][3]):
            torch.testing.assert_close(kernels.skinny_linear(xs[w.shape[1]], w, block_k=128),
                                       F.linear(xs[w.shape[1]], w), atol=2e-2, rtol=1.6e-2)
        theirs = step_ms(F.linear, xs, layers, head)
        print(f"rows {rows}: cuBLAS {theirs:.3f} ms ({gb / theirs * 1e3:.0f} GB/s, "
              f"{gb / theirs * 1e3 / copy:.2f} of copy)", flush=True)
        results = []
        for bn, bk, st, wp in itertools.product((16, 32, 64), (128, 256, 512), (3, 4), (4, 8)):
            fn = partial(kernels.skinny_linear, block_n=bn, block_k=bk, stages=st, warps=wp)
            try:
                ms = step_ms(fn, xs, layers, head)
            except Exception as e:  # a tile that doesn't fit (shared memory)
                print(f"  ({bn}, {bk}, {st}, {wp}): {type(e).__name__}", flush=True)
                continue
            results.append((ms, (bn, bk, st, wp)))
        results.sort()
        for ms, cfg in results[:6]:
            print(f"  skinny {cfg} (block_n, block_k, stages, warps): {ms:.3f} ms, "
                  f"{gb / ms * 1e3 / copy:.2f} of copy, cuBLAS/ours {theirs / ms:.2f}")
        if results:
            print(f"  worst {results[-1][1]}: {results[-1][0]:.3f} ms", flush=True)


def matrix_table(rows_list: list[int], copy: float) -> None:
    """Per matrix, 32 distinct weights called back to back in one CUDA graph (the lm_head once):
    cuBLAS against `kernels.splitk_linear` over a sweep of its tiles and split counts."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {name: [torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
                      / k**0.5 for _ in range(1 if name == "lm_head" else 32)]
               for name, (n, k) in SHAPES.items()}
    configs = [(bn, bk, split, st, 4 if bn == 64 else 8) for bn, bk, split, st in
               itertools.product((64, 128), (64, 128, 256), (1, 2, 4, 8), (3, 4))]
    for rows in rows_list:
        total_theirs = total_ours = 0.0
        for name, ws in weights.items():
            x = torch.randn(rows, ws[0].shape[1], device="cuda", generator=gen,
                            dtype=torch.bfloat16)
            gb = sum(w.numel() for w in ws) * 2 / GB
            theirs = graph_ms([partial(F.linear, x, w) for w in ws]) * len(ws)
            results = []
            for bn, bk, split, st, wp in configs:
                if ws[0].shape[1] % (bk * split) or (name == "lm_head" and split > 1):
                    continue
                fn = partial(kernels.splitk_linear, block_n=bn, block_k=bk, split_k=split,
                             stages=st, warps=wp)
                try:
                    torch.testing.assert_close(fn(x, ws[0]), F.linear(x, ws[0]), atol=2e-2,
                                               rtol=1.6e-2)
                    ms = graph_ms([partial(fn, x, w) for w in ws], replays=10) * len(ws)
                except Exception as e:  # a tile that doesn't fit (shared memory)
                    print(f"  {name} ({bn}, {bk}, {split}, {st}, {wp}): {type(e).__name__}",
                          flush=True)
                    continue
                results.append((ms, (bn, bk, split, st, wp)))
            results.sort()
            total_theirs += theirs
            total_ours += min(theirs, results[0][0])
            skinny = ""
            if rows <= kernels.SKINNY_MAX_ROWS:  # what the engine runs at these rows
                ms = graph_ms([partial(kernels.skinny_linear, x, w) for w in ws]) * len(ws)
                skinny = f"; skinny {ms:.3f} ms ({gb / ms * 1e3 / copy:.2f})"
            print(f"rows {rows} {name}: cuBLAS {theirs:.3f} ms ({gb / theirs * 1e3 / copy:.2f} "
                  f"of copy){skinny}; splitk (block_n, block_k, split, stages, warps) "
                  + ", ".join(f"{c} {ms:.3f} ms {gb / ms * 1e3 / copy:.2f} {theirs / ms:.2f}x"
                              for ms, c in results[:3]), flush=True)
        print(f"rows {rows}: a step's linears, cuBLAS {total_theirs:.3f} ms, the faster of the "
              f"two per matrix {total_ours:.3f} ms: {total_theirs / total_ours:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=parse_sizes,
                        help="row counts, e.g. 16,64: time a step's linears instead")
    parser.add_argument("--matrices", type=parse_sizes,
                        help="row counts, e.g. 32,64: sweep the split-K kernel per matrix")
    args = parser.parse_args()
    print(f"hardware: {hardware()}")
    copy = copy_bandwidth()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write); bf16")
    if args.step:
        step_table(args.step, copy)
    if args.matrices:
        matrix_table(args.matrices, copy)
    if args.step or args.matrices:
        return
    print(f"{'matrix':>8} {'MB':>6} {'cuBLAS us':>9} {'GB/s':>6} {'/copy':>5} "
          f"{'ours us':>8} {'GB/s':>6} {'/copy':>5} {'cuBLAS/ours':>11}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    total_theirs = total_ours = 0.0
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
        x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        assert kernels.skinny_fits(x, w)
        torch.testing.assert_close(kernels.gemv(x, w), F.linear(x, w), atol=2e-2, rtol=1.6e-2)
        theirs = bench_ms(partial(F.linear, x, w))
        ours = bench_ms(partial(kernels.gemv, x, w))
        gb = w.numel() * w.element_size() / GB
        layers = 1 if name == "lm_head" else 32
        total_theirs += theirs * layers
        total_ours += ours * layers
        print(f"{name:>8} {gb * 1e3:>6.0f} {theirs * 1e3:>9.1f} {gb / theirs * 1e3:>6.0f} "
              f"{gb / theirs * 1e3 / copy:>5.2f} {ours * 1e3:>8.1f} {gb / ours * 1e3:>6.0f} "
              f"{gb / ours * 1e3 / copy:>5.2f} {theirs / ours:>11.2f}", flush=True)
    print(f"a batch-1 step's linears (32 layers + lm_head, each call alone): cuBLAS "
          f"{total_theirs:.2f} ms, ours {total_ours:.2f} ms: {total_theirs / total_ours:.2f}x")


if __name__ == "__main__":
    main()
