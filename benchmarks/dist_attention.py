"""Decode step time with one request's KV local vs split over 2 and 4 instances.

One request with a long prompt is prefilled, then `--steps` decode steps are timed on rank 0
(`LLMEngine.step()` wall time, median). For N instances each pool is sized so that the KV must
spread over all N (the owner's pool holds about 1/N of it). Also prints the bytes exchanged per
layer per decoded token (queries out, (out, lse) back, per creditor) next to the bytes of KV a
layer reads, to show that the query travels and the KV stays. CPU ranks talk over gloo; with
`--device cuda` the same script uses NCCL.

    python benchmarks/dist_attention.py [--context 2048] [--steps 32] [--instances 1 2 4]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch

from infinite_llm import LLM, SamplingParams


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores"


def decode_step_ms(instances: int, context: int, steps: int, block_size: int,
                   device: str) -> tuple[float, int]:
    """Median decode step time and how many instances held the request's KV."""
    blocks_needed = math.ceil((context + steps + 1) / block_size)
    per_instance = math.ceil(blocks_needed / instances) + 1
    llm = LLM(num_instances=instances, num_kv_blocks=per_instance, block_size=block_size,
              device=device, max_num_batched_tokens=512)
    engine = llm.engine
    try:
        prompt = torch.randint(100, 40000, (context,), generator=torch.Generator().manual_seed(0))
        engine.add_request(prompt.tolist(),
                           SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
        generated = 0
        while generated < 4:  # prefill (chunked), then a few decode steps to settle leases
            for out in engine.step():
                generated = len(out.outputs[0].token_ids)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - start) * 1e3)
        spread = sum(s.own + s.lent > 0 for s in llm.kv_stats())
        return statistics.median(times), spread
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":  # one core per rank in every run (ranks > 1 set this themselves)
        torch.set_num_threads(1)
    print(f"hardware: {hardware(args.device)}; torch {torch.__version__}; model "
          f"SmolLM2-135M-Instruct; context {args.context}; batch 1; {args.steps} decode steps")
    # SmolLM2: 9 query heads, 3 KV heads, head_dim 64, float32 on CPU.
    heads, kv_heads, dim, elt = 9, 3, 64, 4
    q_bytes, back_bytes = heads * dim * elt, heads * (dim + 1) * 4
    kv_read = 2 * kv_heads * dim * elt * args.context
    print(f"per layer per decoded token and creditor: queries out {q_bytes / 1024:.2f} KB, "
          f"(out, lse) back {back_bytes / 1024:.2f} KB; the layer's KV is "
          f"{kv_read / 1024:.0f} KB (ratio {kv_read / (q_bytes + back_bytes):.0f}x)")
    base = None
    for n in args.instances:
        ms, spread = decode_step_ms(n, args.context, args.steps, args.block_size, args.device)
        base = base or ms
        print(f"instances {n}: KV on {spread} instance(s), decode step {ms:7.2f} ms, "
              f"overhead vs local {ms / base:5.2f}x")


if __name__ == "__main__":
    main()
