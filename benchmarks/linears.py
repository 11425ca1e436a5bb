"""Decode-sized linears: the Triton skinny GEMM (`models/fused.py`) vs cuBLAS (`F.linear`).

Llama-3-8B's weight matrices (bf16): the fused QKV, o_proj, the fused gate/up, down_proj and the
lm_head, times 1 to 16 rows of activations, which is every linear of a decode step at batch
1-16. Such a product is a read of the weights, so bandwidth = weight bytes / time, against a
device-to-device copy of a large tensor (bytes read + written) measured in the same run. Times
are medians of `triton.testing.do_bench` (L2 flushed before every call, as the other 31 layers'
weights flush it in a real step). Prints the hardware, a table and the ratio cuBLAS / ours.

    python benchmarks/linears.py [--rows 1,4,16]     (not `python -P`: it imports attention_kernels)
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from attention_kernels import bench_ms, copy_bandwidth, hardware

from infinite_llm.models import fused

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}  # (out, in) of Llama-3-8B
GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16")
    args = parser.parse_args()
    print(f"hardware: {hardware()}")
    copy = copy_bandwidth()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write); bf16")
    print(f"{'rows':>4} {'matrix':>8} {'MB':>6} {'cuBLAS us':>9} {'GB/s':>6} {'/copy':>5} "
          f"{'ours us':>8} {'GB/s':>6} {'/copy':>5} {'cuBLAS/ours':>11}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    totals = {}
    for rows in (int(r) for r in args.rows.split(",")):
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
            x = torch.randn(rows, k, device="cuda", generator=gen, dtype=torch.bfloat16)
            assert fused.skinny_fits(x, w)
            torch.testing.assert_close(fused.skinny_linear(x, w), F.linear(x, w),
                                       atol=2e-2, rtol=1.6e-2)
            theirs = bench_ms(partial(F.linear, x, w))
            ours = bench_ms(partial(fused.skinny_linear, x, w))
            gb = w.numel() * w.element_size() / GB
            t = totals.setdefault(rows, [0.0, 0.0])
            t[0] += theirs * (1 if name == "lm_head" else 32)  # 32 layers, one lm_head
            t[1] += ours * (1 if name == "lm_head" else 32)
            print(f"{rows:>4} {name:>8} {gb * 1e3:>6.0f} {theirs * 1e3:>9.1f} "
                  f"{gb / theirs * 1e3:>6.0f} {gb / theirs * 1e3 / copy:>5.2f} {ours * 1e3:>8.1f} "
                  f"{gb / ours * 1e3:>6.0f} {gb / ours * 1e3 / copy:>5.2f} {theirs / ours:>11.2f}",
                  flush=True)
    for rows, (theirs, ours) in totals.items():
        print(f"rows {rows}: a step's linears (32 layers + lm_head), cuBLAS {theirs:.2f} ms, "
              f"ours {ours:.2f} ms: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
