"""End-to-end decode speed of a Llama-3-8B-shaped model: our engine vs its roofline and vs HF.

The model has Llama-3-8B's shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128,
intermediate 14336, vocab 128256, rope_theta 500000, llama3 RoPE scaling) and seeded random bf16
weights (`load_format="dummy"`: only config.json is written). Prompts are random token ids.
Prefill is not timed: once every request of a batch has its first token, `--warmup` steps run, then
`--steps` calls of `LLMEngine.step()` are timed, each one decode token for every request (a step
ends with the host reading the sampled tokens; a `torch.cuda.synchronize` bounds the clock too).

Roofline of a step: (weights read + KV read) / copy bandwidth, the bandwidth measured in the same
run (device-to-device copy, bytes read + written). Weights read: every parameter but the embedding
table, plus one embedding row per sequence. KV read: each sequence's K and V in every layer, up to
and including its new token. `GPU busy` is the kernel time of a step under the torch profiler;
where it is well below the step's wall time, the GPU waits for the host to launch kernels.
Plain decode steps replay CUDA graphs (the engine's default on CUDA); `--enforce-eager` runs them
eagerly, to compare. With async scheduling (the default; `--no-async-scheduling` to compare) each
step queues the next decode step before it waits for its tokens, so the clock's last
synchronize also waits for one step that no timed call returns: the timing counts it.
`--kernel-profile [N]` lists each row's top N (8) kernels by GPU time and `--host-profile` its
Python functions by host time.

Hugging Face: transformers' LlamaForCausalLM with the same weights, bf16, sdpa, `generate` (greedy,
exactly n new tokens); its decode time per step = (time of 1 + n new tokens - time of 1) / n.

`--longest`: one request as long as the KV pool holds (`--kv-fraction` of the free memory after the
weights), chunked prefill of `--chunk` tokens per step, then `--longest-steps` timed decode steps.

    python -P benchmarks/decode_e2e.py [--batches 1,16,64,256] [--contexts 1K,8K,32K] [--steps 32]
                                       [--hf-batch 64] [--hf-context 1K] [--no-hf]
                                       [--enforce-eager] [--no-async-scheduling]
                                       [--kernel-profile] [--host-profile]
    python -P benchmarks/decode_e2e.py --longest [--kv-fraction 0.95] [--chunk 8192]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from infinite_llm import LLM, SamplingParams
from infinite_llm.engine.engine import LLMEngine
from infinite_llm.models.llama import LlamaForCausalLM
from infinite_llm.models.loader import PACKED_MODULES

GB = 1e9
LLAMA3_8B: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192),
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
)
# --tiny: the same code on a model small enough for a CPU smoke test
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, bos_token_id=1,
            eos_token_id=2)


def parse_sizes(text: str) -> list[int]:
    return [int(s[:-1]) * 1024 if s.endswith("K") else int(s) for s in text.split(",")]


def size_name(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def hardware(device: torch.device) -> str:
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type != "cuda":
        return f"{platform.machine()}, {os.cpu_count()} CPU cores; {versions}"
    import triton

    from infinite_llm.kernels.common import pdl_args

    props = torch.cuda.get_device_properties(device)
    pdl = "on" if pdl_args(device)["PDL"] else "off (INFINITE_LLM_PDL=0 or before Hopper)"
    return (f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} "
            f"GiB; {os.cpu_count()} CPU cores; {versions}, triton {triton.__version__}; "
            f"programmatic dependent launch {pdl}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy, bytes read + written (median of many)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    else:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        ms = sorted(times)[2] * 1e3
    return 2 * n * src.element_size() / (ms * 1e-3) / GB


def write_config(folder: Path, tiny: bool, **overrides: Any) -> dict[str, Any]:
    config = {**LLAMA3_8B, **(TINY if tiny else {}), **overrides}
    (folder / "config.json").write_text(json.dumps(config))
    return config


def weight_bytes(model: LlamaForCausalLM, batch: int) -> int:
    """Bytes of weights one decode step reads: all but the embedding table, plus its used rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    return (total - embed.numel() * embed.element_size()
            + batch * embed.shape[1] * embed.element_size())


def kv_bytes_per_token(engine: LLMEngine) -> int:
    pool = engine.instance.rmanager.pool
    return 2 * pool.k[:, 0, 0].numel() * pool.k.element_size()  # K and V, every layer


def gpu_busy_ms(engine: LLMEngine, device: torch.device, steps: int = 2,
                top: int = 0) -> float | None:
    """Kernel time per step (ms) under the torch profiler, printing the `top` kernels by time;
    None off CUDA or if the profiler fails."""
    if device.type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
        kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    except Exception as error:  # the numbers above stand without it
        print(f"  (profiler failed: {error})")
        return None
    us = sum(e.self_device_time_total for e in kernels)
    if top:
        print(f"  kernels per step: {sum(e.count for e in kernels) / steps:.0f}, "
              f"{us / steps / 1e3:.2f} ms; top by GPU time:")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
            print(f"    {e.key[:60]:60} {e.count / steps:5.0f}/step "
                  f"{e.self_device_time_total / steps / 1e3:7.3f} ms")
    return us / steps / 1e3 if us else None


def host_profile(engine: LLMEngine, steps: int = 10, top: int = 10) -> None:
    """Where the host's time goes over `steps` steps: Python functions by their own time
    (cProfile). Waiting for the GPU shows up in `.tolist()` (the sampled tokens)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total_ms = stats.total_tt / steps * 1e3
    print(f"  host profile: {total_ms:.2f} ms per step under cProfile; top by own time:")
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
    for (file, line, name), (_, calls, own, cumulative, _) in rows:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"    {where[:52]:52} {calls / steps:7.1f}/step own {own / steps * 1e3:6.3f} ms "
              f"cum {cumulative / steps * 1e3:6.3f} ms")


def random_prompt(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def measure_decode(llm: LLM, batch: int, context: int, args: argparse.Namespace,
                   device: torch.device, bandwidth: float) -> dict[str, Any] | str:
    """One row of the table, or why it was skipped."""
    engine = llm.engine
    bs = engine.config.cache.block_size
    prefill_steps = -(-batch * context // args.chunk) + 1
    profiled = (2 if args.profile else 0) + (10 if args.host_profile else 0)
    extra = prefill_steps + args.warmup + args.steps + profiled + 3  # tokens a request may reach
    need = batch * -(-(context + extra) // bs)
    total = llm.kv_stats()[0].total
    if need > total or context + extra > engine.max_model_len:
        return f"skipped (memory: needs {need} KV blocks, the pool has {total})"
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(batch * 100003 + context)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    ids = [engine.add_request(random_prompt(gen, vocab, context), params) for _ in range(batch)]
    outputs = [engine.outputs[i] for i in ids]
    sync(device)
    start = time.perf_counter()
    while any(not o.outputs[0].token_ids for o in outputs):  # prefill (and early decodes)
        engine.step()
    sync(device)
    prefill_s = time.perf_counter() - start
    for _ in range(args.warmup):
        engine.step()
    preemptions = engine.num_preemptions
    kv_tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outputs)
    graphs = engine.instance.runner.graphs
    num_graphs = 0 if graphs is None else len(graphs.graphs)
    pauses: list[float] = []  # Python's full collections while timed, seconds each
    gc_start: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                gc_start.append(time.perf_counter())
            elif gc_start:
                pauses.append(time.perf_counter() - gc_start.pop())

    gc.callbacks.append(on_gc)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        if len(engine.step()) != batch:
            raise RuntimeError("a timed step did not decode every sequence")
    sync(device)
    step_s = (time.perf_counter() - start) / args.steps
    gc.callbacks.remove(on_gc)
    captured = 0 if graphs is None else len(graphs.graphs) - num_graphs
    del graphs  # (no reference may outlive the engine: HF below needs the pool freed)
    busy = gpu_busy_ms(engine, device, top=args.kernel_profile) \
        if args.profile else None
    if args.host_profile:
        host_profile(engine)
    clean = engine.num_preemptions == preemptions
    for request_id in ids:
        engine.abort_request(request_id)
    stats = llm.kv_stats()[0]
    if stats.free != stats.total:
        raise RuntimeError(f"blocks left behind: {stats}")
    model = engine.instance.model
    mean_kv = kv_tokens + batch * (args.steps - 1) / 2  # tokens attended per step, on average
    w_bytes = weight_bytes(model, batch)
    kv_bytes = mean_kv * kv_bytes_per_token(engine)
    roof_s = (w_bytes + kv_bytes) / (bandwidth * GB)
    return dict(batch=batch, context=context, prefill_s=prefill_s, step_ms=step_s * 1e3,
                tok_s=batch / step_s, roof_ms=roof_s * 1e3, w_gb=w_bytes / GB, kv_gb=kv_bytes / GB,
                frac=roof_s / step_s, busy_ms=busy, clean=clean, captured=captured,
                gc_ms=[round(t * 1e3, 1) for t in pauses])


def print_row(row: dict[str, Any]) -> None:
    busy = "n/a" if row["busy_ms"] is None else f"{row['busy_ms']:.2f}"
    busy_frac = "" if row["busy_ms"] is None else f"{row['busy_ms'] / row['step_ms']:.2f}"
    note = "" if row["clean"] else "  (preempted while timed)"
    if row["captured"]:
        note += f"  ({row['captured']} CUDA graph(s) captured while timed)"
    if row["gc_ms"]:
        note += f"  (Python full collections while timed, ms: {row['gc_ms']})"
    print(f"{row['batch']:>6} {size_name(row['context']):>7} {row['prefill_s']:>9.1f} "
          f"{row['step_ms']:>8.2f} {row['tok_s']:>9.0f} {row['roof_ms']:>8.2f} "
          f"{row['w_gb']:>6.2f} {row['kv_gb']:>6.2f} {row['frac']:>7.2f} {busy:>9} "
          f"{busy_frac:>9}{note}", flush=True)


def hf_from_ours(model: LlamaForCausalLM, config: dict[str, Any], device: torch.device):
    """transformers' LlamaForCausalLM (sdpa) holding a copy of our model's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    hf_config = AutoConfig.for_model(config["model_type"], **kwargs)
    dtype = model.model.embed_tokens.weight.dtype
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    ours = dict(model.named_parameters())
    mc = model.config
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    sizes = {"qkv_proj": (q, kv, kv), "gate_up_proj": (mc.intermediate_size,) * 2}
    with torch.no_grad():
        for name, param in hf.named_parameters():
            source = ours.get(name)
            for part, (fused, shard) in PACKED_MODULES.items():
                if f".{part}." in name:
                    rows = sizes[fused]
                    source = ours[name.replace(part, fused)].narrow(0, sum(rows[:shard]),
                                                                     rows[shard])
            if source is None:
                raise KeyError(f"no weight of ours for HF's {name}")
            param.copy_(source)
    ours_freq = model.model.rotary.inv_freq
    if not torch.allclose(hf.model.rotary_emb.inv_freq.float(), ours_freq.float()):
        raise RuntimeError("HF's RoPE frequencies differ from ours")
    return hf.eval()


@torch.inference_mode()
def hf_generate(hf, ids: torch.Tensor, n: int, device: torch.device) -> tuple[torch.Tensor, float]:
    sync(device)
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    sync(device)
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, not {n}")
    return out[:, ids.shape[1]:], time.perf_counter() - start


def decode_table(args: argparse.Namespace, device: torch.device, folder: Path) -> None:
    config = write_config(folder, args.tiny)
    bandwidth = copy_bandwidth(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    options: dict[str, Any] = dict(load_format="dummy", max_num_batched_tokens=args.chunk,
                                   max_num_seqs=max(args.batches), device=str(device),
                                   enforce_eager=args.enforce_eager,
                                   async_scheduling=args.async_scheduling)
    if args.num_kv_blocks:
        options["num_kv_blocks"] = args.num_kv_blocks
    if args.kv_fraction:
        options["kv_cache_fraction"] = args.kv_fraction
    start = time.perf_counter()
    llm = LLM(str(folder), **options)
    engine = llm.engine
    if engine.instance.runner.graphs is not None:
        print(f"engine start: {time.perf_counter() - start:.1f} s, with "
              f"{len(engine.instance.runner.graphs.graphs)} decode graphs captured")
    model = engine.instance.model
    params = sum(p.numel() for p in model.parameters())
    total_blocks = llm.kv_stats()[0].total
    print(f"model: Llama-3-8B shapes{' (--tiny)' if args.tiny else ''}, {params / 1e9:.2f} B "
          f"params, {weight_bytes(model, 0) / GB:.2f} GB of weights read per step + the embedding "
          f"rows; random weights; KV {kv_bytes_per_token(engine) / 1024:.0f} KiB/token; pool "
          f"{total_blocks} blocks x {engine.config.cache.block_size} tokens; chunk {args.chunk} "
          "tokens")
    print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)")
    print(f"timed: {args.steps} decode steps after {args.warmup} warm-up steps; "
          "goal: >= 0.85 of roofline")
    print(f"{'batch':>6} {'context':>7} {'prefill s':>9} {'ms/step':>8} {'tok/s':>9} "
          f"{'roof ms':>8} {'W GB':>6} {'KV GB':>6} {'of roof':>7} {'GPU busy':>9} "
          f"{'busy/step':>9}", flush=True)
    rows = {}
    for batch in args.batches:
        for context in args.contexts:
            row = measure_decode(llm, batch, context, args, device, bandwidth)
            if isinstance(row, str):
                print(f"{batch:>6} {size_name(context):>7}  {row}", flush=True)
                continue
            rows[batch, context] = row
            print_row(row)
    if engine.instance.runner.graphs is not None:  # (no local name: HF below needs the pool freed)
        print(f"decode steps queued ahead (async scheduling): "
              f"{engine.instance.runner.steps_ahead}, of which used "
              f"{engine.instance.runner.steps_ahead_used}", flush=True)
    if args.no_hf:
        return
    # Greedy tokens of ours for the HF cross-check, then only the model is kept.
    gen = torch.Generator().manual_seed(1)
    check = [random_prompt(gen, config["vocab_size"], 32) for _ in range(2)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ours_tokens = [o.outputs[0].token_ids for o in llm.generate(check, greedy, use_tqdm=False)]
    del llm, engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = hf_from_ours(model, config, device)
    del model
    gc.collect()
    hf_tokens, _ = hf_generate(hf, torch.tensor(check, device=device), 8, device)
    same = sum(a == b for o, h in zip(ours_tokens, hf_tokens.tolist()) for a, b in zip(o, h))
    print(f"greedy cross-check, 2 random prompts x 8 tokens: {same}/16 tokens equal to HF's "
          "(bf16 kernels differ, so near-ties may flip)")
    batch, context = args.hf_batch, args.hf_context
    ids = torch.randint(0, config["vocab_size"], (batch, context), device=device,
                        generator=torch.Generator(device=device).manual_seed(2))
    hf_generate(hf, ids, 2, device)  # warm-up
    _, t_one = hf_generate(hf, ids, 1, device)
    _, t_many = hf_generate(hf, ids, 1 + args.hf_steps, device)
    hf_step = (t_many - t_one) / args.hf_steps
    hf_tok_s = batch / hf_step
    print(f"Hugging Face generate (sdpa, {hf.dtype}), batch {batch}, context "
          f"{size_name(context)}: {hf_step * 1e3:.1f} ms/step, {hf_tok_s:.0f} tok/s "
          f"(prefill + 1 token: {t_one:.2f} s)")
    ours = rows.get((batch, context))
    if ours is None:
        print(f"ours at batch {batch}, context {size_name(context)}: not in the table")
    else:
        print(f"ours: {ours['step_ms']:.1f} ms/step, {ours['tok_s']:.0f} tok/s; ours / HF = "
              f"{ours['tok_s'] / hf_tok_s:.1f}x (goal >= 10x)")


def longest(args: argparse.Namespace, device: torch.device, folder: Path) -> None:
    write_config(folder, args.tiny, max_position_embeddings=args.longest_positions)
    bandwidth = copy_bandwidth(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    options: dict[str, Any] = dict(load_format="dummy", max_num_batched_tokens=args.chunk,
                                   max_num_seqs=1, device=str(device),
                                   enforce_eager=args.enforce_eager,
                                   async_scheduling=args.async_scheduling)
    if args.num_kv_blocks:
        options["num_kv_blocks"] = args.num_kv_blocks
    else:
        options["kv_cache_fraction"] = args.kv_fraction or 0.95
    llm = LLM(str(folder), **options)
    engine = llm.engine
    stats = llm.kv_stats()[0]
    bs = engine.config.cache.block_size
    kv_token = kv_bytes_per_token(engine)
    free = torch.cuda.mem_get_info(device)[0] / GB if device.type == "cuda" else float("nan")
    print(f"pool: {stats.total} blocks x {bs} tokens = {stats.total * bs} tokens, "
          f"{stats.total * bs * kv_token / GB:.1f} GB (kv_cache_fraction "
          f"{options.get('kv_cache_fraction')}); {free:.1f} GB left free on the device")
    steps = args.longest_steps
    prompt_len = engine.max_model_len - steps - 1
    gen = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    request_id = engine.add_request(random_prompt(gen, engine.model_config.vocab_size,
                                                  prompt_len), params)
    output = engine.outputs[request_id]
    print(f"one request: {prompt_len} prompt tokens + {steps + 1} generated = "
          f"{prompt_len + steps + 1} tokens; chunked prefill of {args.chunk} tokens per step",
          flush=True)
    start = time.perf_counter()
    chunks = 0
    while not output.outputs[0].token_ids:
        engine.step()
        chunks += 1
        if chunks % 8 == 0:
            sync(device)
            done = min(chunks * args.chunk, prompt_len)
            print(f"  prefill {done} tokens, {time.perf_counter() - start:.0f} s", flush=True)
    sync(device)
    prefill_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if len(engine.step()) != 1:
            raise RuntimeError("a decode step produced no token")
        sync(device)
        times.append(time.perf_counter() - start)
    if not output.finished or len(output.outputs[0].token_ids) != steps + 1:
        raise RuntimeError("the request did not finish with all its tokens")
    mean_ms = sum(times) / steps * 1e3
    median_ms = sorted(times)[steps // 2] * 1e3
    context = prompt_len + steps // 2
    roof_ms = (weight_bytes(engine.instance.model, 1) + context * kv_token) / (bandwidth * GB) * 1e3
    print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)")
    print(f"prefill: {prompt_len} tokens in {prefill_s:.1f} s ({prompt_len / prefill_s:.0f} tok/s,"
          f" {chunks} steps)")
    print(f"decode at {size_name(prompt_len) if prompt_len % 1024 == 0 else prompt_len} tokens of "
          f"context: {mean_ms:.2f} ms/token mean, {median_ms:.2f} median over {steps} steps; "
          f"roofline {roof_ms:.2f} ms ({roof_ms / mean_ms:.2f} of it)")
    print(f"longest context served: {prompt_len + steps + 1} tokens (goal >= 400K = 409600)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=parse_sizes, default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=parse_sizes, default=parse_sizes("1K,8K,32K"))
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--kv-fraction", type=float, default=None,
                        help="kv_cache_fraction (engine default 0.9; --longest 0.95)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs: every step runs eagerly")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=True, help="queue the next decode step before this one's "
                        "tokens reach the host (the engine's default)")
    parser.add_argument("--host-profile", action="store_true",
                        help="each row: Python functions by host time (cProfile)")
    parser.add_argument("--kernel-profile", type=int, nargs="?", const=8, default=0,
                        metavar="N", help="each row: the top N (8) kernels by GPU time")
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--hf-context", type=parse_sizes, default=[1024])
    parser.add_argument("--hf-steps", type=int, default=32)
    parser.add_argument("--longest", action="store_true")
    parser.add_argument("--longest-steps", type=int, default=16)
    parser.add_argument("--longest-positions", type=int, default=655360,
                        help="max_position_embeddings for --longest (the RoPE table's length)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test)")
    args = parser.parse_args()
    args.hf_context = args.hf_context[0]
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    print("command: python -P benchmarks/decode_e2e.py " + " ".join(sys.argv[1:]))
    print(f"hardware: {hardware(device)}", flush=True)
    graphs = device.type == "cuda" and not args.enforce_eager
    print(f"decode steps: {'CUDA graphs' if graphs else 'eager'}, async scheduling "
          f"{'on' if graphs and args.async_scheduling else 'off'}")
    with tempfile.TemporaryDirectory() as tmp:
        (longest if args.longest else decode_table)(args, device, Path(tmp))


if __name__ == "__main__":
    main()
