"""Decode step time with one request's KV local vs split over 2 and 4 instances.

One request with a long prompt is prefilled, then `--steps` decode steps are timed on rank 0
(`LLMEngine.step()` wall time, median). For N instances each pool is sized so that the KV must
spread over all N (the owner's pool holds about 1/N of it). Also prints the bytes exchanged per
layer per decoded token (queries out, (out, lse) back, per creditor) next to the bytes of KV a
layer reads, to show that the query travels and the KV stays, and whether each run's greedy
tokens equal the first run's (the KV on fewer instances). CPU ranks talk over gloo; with
`--device cuda` the same script uses NCCL, one GPU per rank.

    python benchmarks/dist_attention.py [--context 2048] [--steps 32] [--instances 1 2 4]
    python benchmarks/dist_attention.py --device cuda --model DIR --load-format dummy \
        --context 32768 --chunk 8192 --instances 1 2      # e.g. decode_e2e.py's Llama-3-8B shapes

Results over time: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import platform
import pstats
import statistics
import time

import torch

from infinite_llm import LLM, SamplingParams
from infinite_llm.config import EngineConfig
from infinite_llm.models.loader import load_model_config, resolve_model


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores"


def decode_step_ms(instances: int, args: argparse.Namespace) -> tuple[float, int, list[int]]:
    """Median decode step time, how many instances held the request's KV, and its tokens."""
    context, steps = args.context, args.steps
    blocks_needed = math.ceil((context + steps + 8) / args.block_size)
    per_instance = math.ceil(blocks_needed / instances) + 1
    llm = LLM(args.model, num_instances=instances, num_kv_blocks=per_instance,
              block_size=args.block_size, device=args.device, max_num_batched_tokens=args.chunk,
              load_format=args.load_format, enforce_eager=args.enforce_eager, dtype=args.dtype,
              data_backend=args.data_backend)
    engine = llm.engine
    try:
        vocab = llm.engine.model_config.vocab_size
        prompt = torch.randint(10, vocab, (context,), generator=torch.Generator().manual_seed(0))
        engine.add_request(prompt.tolist(),
                           SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True))
        tokens: list[int] = []
        while len(tokens) < 4:  # prefill (chunked), then a few decode steps to settle leases
            for out in engine.step():
                tokens = out.outputs[0].token_ids
        times = []
        profiler = cProfile.Profile() if args.profile else None
        for _ in range(steps):
            start = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            for out in engine.step():
                tokens = out.outputs[0].token_ids
            if profiler is not None:
                profiler.disable()
            times.append((time.perf_counter() - start) * 1e3)
        if profiler is not None:
            print(f"  host profile, instances {instances}: {args.profile} functions by own time")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
        spread = sum(s.own + s.lent > 0 for s in llm.kv_stats())
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = out.outputs[0].token_ids
        return statistics.median(times), spread, list(tokens)
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="HF folder or .gguf (default: the default model)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                        help="dummy: random weights from config.json alone")
    parser.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    parser.add_argument("--dtype", default="auto", help="the engine's dtype (auto: float32 on "
                        "CPU, bfloat16 on GPU; float32 makes near-tied greedy tokens of random "
                        "weights flip less)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile the timed steps on rank 0; print the top N functions")
    parser.add_argument("--data-backend", default="auto", choices=["auto", "nccl", "gloo"],
                        help="gloo puts several instances on one GPU (NCCL refuses)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs, also for local steps (exchanging steps never "
                             "replay graphs)")
    args = parser.parse_args()
    if args.device == "cpu":  # one core per rank in every run (ranks > 1 set this themselves)
        torch.set_num_threads(1)
    mc = load_model_config(resolve_model(args.model))
    load = EngineConfig.from_options(device=args.device, dtype=args.dtype).load
    elt = load.torch_dtype.itemsize  # the KV's
    print(f"hardware: {hardware(args.device)}; torch {torch.__version__}; model "
          f"{args.model or 'SmolLM2-135M-Instruct'} ({mc.num_layers} layers, {mc.num_heads} q "
          f"heads, {mc.num_kv_heads} KV heads, head_dim {mc.head_dim}, {args.load_format} "
          f"weights); context {args.context}; batch 1; {args.steps} decode steps"
          f"{'; eager' if args.enforce_eager else ''}")
    q_bytes = mc.num_heads * mc.head_dim * elt
    back_bytes = mc.num_heads * (mc.head_dim + 1) * 4
    kv_read = 2 * mc.num_kv_heads * mc.head_dim * elt * args.context
    print(f"per layer per decoded token and creditor: queries out {q_bytes / 1024:.2f} KB, "
          f"(out, lse) back {back_bytes / 1024:.2f} KB; the layer's KV is "
          f"{kv_read / 1024:.0f} KB (ratio {kv_read / (q_bytes + back_bytes):.0f}x)")
    base, first = None, None
    for n in args.instances:
        ms, spread, tokens = decode_step_ms(n, args)
        base, first = base or ms, first or tokens
        same = next((i for i, (a, b) in enumerate(zip(tokens, first)) if a != b), len(tokens))
        print(f"instances {n}: KV on {spread} instance(s), decode step {ms:7.2f} ms, "
              f"overhead vs local {ms / base:5.2f}x; {len(tokens)} greedy tokens "
              f"{'equal' if tokens == first else 'DIFFER from'} the first run's (the first "
              f"{same} equal)", flush=True)


if __name__ == "__main__":
    main()
