"""Offline generation throughput of the default model vs Hugging Face `generate`, same run.

Both generate exactly `--new-tokens` tokens per prompt (EOS ignored), greedy, float32, from the
same chat prompts. Batch 1 runs `--batch1-prompts` of them one after another; batch B runs B of
them together (HF pads on the left). Each row runs `--repeats` times, the engines alternating, and
shows the median (the machine is shared: a load that comes and goes shows as a spread of the runs,
which are printed too, with the load average after each row). Prints the hardware, tokens/s, the
ratios, and for how many of the batch-1 prompts each engine's greedy tokens equal HF's at batch 1
(unpadded: the exact reference).

Threads: HF runs on torch's default thread count. On CPU the engine runs one-token steps (batch 1
decode) on one thread and picks one thread or the default count for larger steps by timing them
(`infinite_llm/engine/threads.py`), and each row says how many of its steps ran on each count;
so that no ratio is read as coming from that policy alone, HF is also measured on one thread at
each batch size.

    python benchmarks/throughput.py [--batch 32] [--new-tokens 64] [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import Counter

import torch
from transformers import AutoModelForCausalLM

from infinite_llm import LLM, SamplingParams
from infinite_llm.engine.threads import StepThreads
from infinite_llm.models.loader import resolve_model

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
    args = parser.parse_args()
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
    step_threads = llm.engine.instance.step_threads
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


if __name__ == "__main__":
    main()
