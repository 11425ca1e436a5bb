"""One-row linears: the Triton GEMV (`models/fused.py`) vs cuBLAS (`F.linear`).

Llama-3-8B's weight matrices (bf16): the fused QKV, o_proj, the fused gate/up, down_proj and the
lm_head, times one row of activations: every linear of a decode step at batch 1. Such a
product is a read of the weights, so bandwidth = weight bytes / time, against a
device-to-device copy of a large tensor (bytes read + written) measured in the same run. Times
are medians of `triton.testing.do_bench` (L2 flushed before every call, as the other 31 layers'
weights flush it in a real step). Prints the hardware, a table and the ratio cuBLAS / ours.

    python benchmarks/linears.py     (not `python -P`: it imports attention_kernels)
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
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(f"hardware: {hardware()}")
    copy = copy_bandwidth()
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write); bf16")
    print(f"{'matrix':>8} {'MB':>6} {'cuBLAS us':>9} {'GB/s':>6} {'/copy':>5} "
          f"{'ours us':>8} {'GB/s':>6} {'/copy':>5} {'cuBLAS/ours':>11}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    total_theirs = total_ours = 0.0
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
        x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        assert fused.gemv_fits(x, w)
        torch.testing.assert_close(fused.gemv(x, w), F.linear(x, w), atol=2e-2, rtol=1.6e-2)
        theirs = bench_ms(partial(F.linear, x, w))
        ours = bench_ms(partial(fused.gemv, x, w))
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
