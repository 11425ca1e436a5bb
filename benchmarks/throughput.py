"""Offline generation throughput of the default model vs Hugging Face `generate`, same run.

Both generate exactly `--new-tokens` tokens per prompt (EOS ignored), greedy, float32, from the
same chat prompts. Batch 1 runs `--batch1-prompts` of them one after another; batch B runs B of
them together (HF pads on the left). Each row runs `--repeats` times, the engines alternating, and
shows the median (the machine is shared: a load that comes and goes shows as a spread of the runs,
which are printed too, with the load average after each row). Prints the hardware, tokens/s, the
ratios, and for how many of the batch-1 prompts each engine's greedy tokens equal HF's at batch 1
(unpadded: the exact reference).

Threads: HF runs on torch's default thread count. On CPU the engine picks one thread or the
default count for each size of step by timing them (`infinite_llm/worker/threads.py`), and each
row says how many of its steps ran on each count;
so that no ratio is read as coming from that policy alone, HF is also measured on one thread at
each batch size.

The last line bounds what any float32 engine could do on this CPU: each generated token needs
2 FLOP per weight of the linears, and a large square matmul timed in the same run gives the CPU's
float32 rate, so tokens/s can't exceed rate / (2 x weights), whatever the kernels or schedule.

`--linears` instead times the model's linears alone, F.linear (MKL) against oneDNN's packed
weights (the CPU backend of `layers.Linear` for `PACKED_ROWS` rows), at several row counts.

    python benchmarks/throughput.py [--batch 32] [--new-tokens 64] [--device cpu] [--repeats 3]
    python benchmarks/throughput.py --linears
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import Counter
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from infinite_llm import LLM, SamplingParams
from infinite_llm.models.layers import Linear, pack_weight, packed_linear
from infinite_llm.models.llama import LlamaForCausalLM
from infinite_llm.models.loader import load_model, resolve_model
from infinite_llm.worker.threads import StepThreads

TOPICS = ["the sea", "a city at night", "autumn", "a robot", "mountains", "coffee", "the moon",
          "a library", "rain", "a train journey", "friendship", "the desert", "snow", "music",
          "a garden", "the stars", "a lighthouse", "bread", "a river", "the wind", "a clock",
          "a forest", "a market", "winter", "an island", "a bridge", "a candle", "the ocean floor",
          "a kite", "a volcano", "a violin", "sunrise"]


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_ours(llm: LLM, prompts: list[list[int]], batch: int,
             n: int) -> tuple[float, list[list[int]]]:
    """Tokens/s and the tokens generated for each prompt."""
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    tokens = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs = llm.generate(prompts[i : i + batch], params, use_tqdm=False)
        tokens += [o.outputs[0].token_ids for o in outs]
        assert all(len(t) == n for t in tokens)
    return len(prompts) * n / (time.perf_counter() - start), tokens


def threads_used(threads: StepThreads, steps: Counter[int], seconds: dict[int, float]) -> str:
    """How many engine steps ran on each thread count (CPU: its timing policy) since `steps`
    and `seconds` were copied from `threads`."""
    used = "; ".join(f"{threads.steps[t] - steps[t]} on {t} thread{'s' * (t > 1)} "
                     f"({threads.seconds[t] - seconds.get(t, 0.0):.1f} s)"
                     for t in sorted(threads.steps) if threads.steps[t] > steps[t])
    return used or "no thread choice (GPU)"


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm-up (first-call allocations, oneDNN's kernel choice)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def matmul_gflops() -> float:
    """This CPU's float32 rate on a 2048 x 2048 x 2048 matmul: MKL runs it near the cores' peak."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / seconds_per_call(lambda: a @ b, 5) / 1e9


def linear_weights(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """The weight of every matrix product in a token's forward pass (tied logits included)."""
    return [m.weight for m in model.modules() if isinstance(m, Linear)]


def products(xs: list[torch.Tensor], weights: list[torch.Tensor],
             packed: list[torch.Tensor | None] | None) -> None:
    """x @ w.T for each pair: by F.linear, or by oneDNN on the packed weights when given."""
    for i, (x, w) in enumerate(zip(xs, weights)):
        if packed is None:
            F.linear(x, w)
        else:
            packed_linear(x, packed[i])


def time_linears(threads: int) -> None:
    """A step's linears (every layer's and the logits'), F.linear against the packed path."""
    model = load_model(resolve_model(None), torch.float32, torch.device("cpu"))
    weights = linear_weights(model)
    packed = [pack_weight(w) for w in weights]
    flops_per_row = 2 * sum(w.numel() for w in weights)
    print(f"hardware: {hardware('cpu')}; torch {torch.__version__}; SmolLM2-135M-Instruct float32"
          f", {len(weights)} products a step, {flops_per_row / 2e6:.1f}M weights; {load()}")
    print(f"float32 matmul 2048^3: {matmul_gflops():.0f} GFLOP/s on {threads} threads")
    print("threads rows  F.linear ms  GFLOP/s  packed ms  GFLOP/s  F.linear/packed")
    for t in (1, threads) if threads > 1 else (1,):
        torch.set_num_threads(t)
        for rows in (1, 8, 32, 64, 128, 256, 1024):
            xs = [torch.randn(rows, w.shape[1]) for w in weights]
            mkl = seconds_per_call(partial(products, xs, weights, None), 3)
            onednn = seconds_per_call(partial(products, xs, weights, packed), 3)
            gf = flops_per_row * rows / 1e9
            print(f"{t:7d} {rows:4d} {mkl * 1e3:12.1f} {gf / mkl:8.0f} {onednn * 1e3:10.1f} "
                  f"{gf / onednn:8.0f} {mkl / onednn:16.2f}", flush=True)
    torch.set_num_threads(threads)


def listed(rates: list[float]) -> str:
    return " ".join(f"{r:.1f}" for r in rates) or "-"


def agree(got: list[list[int]], exact: list[list[int]]) -> str:
    """How many of `exact`'s prompts got exactly its tokens, as 'k/n'."""
    return f"{sum(a == b for a, b in zip(got, exact))}/{len(exact)}"


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], batch: int, n: int,
           device: str) -> tuple[float, list[list[int]]]:
    """Tokens/s and the tokens generated for each prompt."""
    tokens = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        assert out.shape[1] == width + n
        tokens += out[:, width:].tolist()
    return len(prompts) * n / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch1-prompts", type=int, default=8,
                        help="prompts run one at a time for batch 1 (a rate: fewer suffice)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each row, alternating engines; the median is shown")
    parser.add_argument("--linears", action="store_true",
                        help="time the model's linears alone (F.linear vs packed) and exit")
    args = parser.parse_args()
    if args.linears:
        time_linears(torch.get_num_threads())
        return
    n, device = args.new_tokens, args.device
    dtype = torch.float32
    llm = LLM(device=device, dtype="float32", max_num_seqs=args.batch)
    prompts = [llm.apply_chat_template([{"role": "user", "content": f"Write a poem about {t}."}])
               for t in TOPICS[: args.batch]]
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=dtype).to(device)
    threads = torch.get_num_threads()
    print(f"hardware: {hardware(device)}; torch {torch.__version__}; threads {threads}; model "
          f"SmolLM2-135M-Instruct float32; {len(prompts)} prompts, {n} new tokens each; {load()}")
    run_ours(llm, prompts[:2], 2, 4)  # warm-up
    run_hf(hf, prompts[:2], 2, 4, device)
    rows = []
    tokens: dict[tuple[str, int], list[list[int]]] = {}  # (engine, batch) -> each prompt's
    step_threads = llm.engine.instance.runner.step_threads
    for batch in (1, args.batch):
        subset = prompts[: args.batch1_prompts] if batch == 1 else prompts
        steps, seconds = step_threads.steps.copy(), dict(step_threads.seconds)
        runs: dict[str, list[float]] = {"ours": [], "hf": [], "hf1": []}
        for _ in range(args.repeats):  # alternating, so a passing load hits both alike
            rate, tokens["ours", batch] = run_ours(llm, subset, batch, n)
            runs["ours"].append(rate)
            rate, tokens["hf", batch] = run_hf(hf, subset, batch, n, device)
            runs["hf"].append(rate)
            if device == "cpu" and threads > 1:
                torch.set_num_threads(1)
                runs["hf1"].append(run_hf(hf, subset, batch, n, device)[0])
                torch.set_num_threads(threads)
        ours, ref = statistics.median(runs["ours"]), statistics.median(runs["hf"])
        rows.append((batch, ours, ref))
        print(f"batch {batch:3d}: infinite-llm {ours:8.1f} tok/s | HF generate {ref:8.1f} tok/s "
              f"| ratio {ours / ref:5.2f}x", flush=True)
        if runs["hf1"]:
            ref1 = statistics.median(runs["hf1"])
            print(f"batch {batch:3d}: HF generate on 1 thread {ref1:8.1f} tok/s | ratio "
                  f"{ours / ref1:5.2f}x", flush=True)
        print(f"   runs (tok/s): infinite-llm {listed(runs['ours'])} | HF {listed(runs['hf'])} | "
              f"HF on 1 thread {listed(runs['hf1'])}; infinite-llm steps: "
              f"{threads_used(step_threads, steps, seconds)}; {load()}", flush=True)
    # HF one prompt at a time pads nothing: its tokens are the exact reference.
    exact, b = tokens["hf", 1], args.batch
    print(f"greedy tokens equal to HF batch 1 (first {len(exact)} prompts): infinite-llm batch 1 "
          f"{agree(tokens['ours', 1], exact)}, batch {b} {agree(tokens['ours', b], exact)}; "
          f"HF batch {b} (left-padded) {agree(tokens['hf', b], exact)}")
    hf_b1 = rows[0][2]
    print(f"infinite-llm batch {args.batch} vs HF batch 1: {rows[1][1] / hf_b1:5.2f}x; {load()}")
    if device == "cpu":
        weights = sum(w.numel() for w in linear_weights(llm.engine.instance.model))
        rate = matmul_gflops()
        ceiling = rate * 1e9 / (2 * weights)
        print(f"ceiling: a generated token needs 2 x {weights / 1e6:.1f}M FLOP in the linears; at "
              f"this CPU's float32 matmul rate ({rate:.0f} GFLOP/s, timed now on {threads} "
              f"threads) no float32 engine exceeds {ceiling:.0f} tok/s = "
              f"{ceiling / rows[1][2]:.2f}x HF at batch {args.batch}; {load()}")


if __name__ == "__main__":
    main()
