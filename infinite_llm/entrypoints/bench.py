"""`infinite-llm bench serve`: load a running OpenAI-compatible server, like `vllm bench serve`.

    infinite-llm bench serve --url http://127.0.0.1:8000 --random-input-len 128 \\
        --random-output-len 64 --num-prompts 100 --request-rate 4 --slo-ttft-ms 500

Every request streams from /v1/completions with a prompt of random token ids (so its length is
exact whatever the tokenizer), `ignore_eos` (so its output length is exact) and greedy sampling.
Arrivals are Poisson at `--request-rate` (seeded), or a trace's own `arrival_s`. Per request it
records TTFT (send -> first token chunk), the gaps between token chunks (ITL), TPOT
((latency - TTFT) / (tokens - 1)) and latency; the report gives throughput, mean/p50/p99 of each,
and goodput (completed requests per second meeting every SLO given). Output: a table on stdout,
a JSON file and a PNG of the distributions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: list[int]
    output_len: int
    arrival_s: float | None = None  # from a trace; None: Poisson arrivals decide


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    output_len: int  # asked for
    start_s: float = 0.0  # sent, relative to the benchmark's start
    ok: bool = False
    output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.latency_s is None or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


# ---- workloads ---------------------------------------------------------------------------


def random_requests(
    num: int, input_len: int, output_len: int, vocab_size: int, rng: random.Random
) -> list[BenchRequest]:
    return [BenchRequest([rng.randrange(vocab_size) for _ in range(input_len)], output_len)
            for _ in range(num)]


def trace_requests(path: Path, vocab_size: int, rng: random.Random) -> list[BenchRequest]:
    """One JSON object per line: `prompt_len`, `output_len` (ints), optional `arrival_s`; other
    fields are ignored."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt_len, output_len = int(row["prompt_len"]), int(row["output_len"])
            arrival = row.get("arrival_s")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: not a trace line ({e})") from e
        if prompt_len < 1 or output_len < 1:
            raise ValueError(f"{path}:{number}: prompt_len and output_len must be >= 1")
        prompt = [rng.randrange(vocab_size) for _ in range(prompt_len)]
        out.append(BenchRequest(prompt, output_len, None if arrival is None else float(arrival)))
    if not out:
        raise ValueError(f"{path} holds no requests")
    return out


def poisson_arrivals(num: int, rate: float, rng: random.Random) -> list[float]:
    """Start times (s) of a Poisson process at `rate` per second; all 0 when rate is inf."""
    if math.isinf(rate):
        return [0.0] * num
    t, out = 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ---- running -----------------------------------------------------------------------------


async def _send(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                result: RequestResult) -> None:
    start = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
        result.latency_s = time.perf_counter() - start
        result.ok = result.ttft_s is not None
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"


async def run_requests(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    arrivals: list[float],
    max_concurrency: int | None = None,
    api_key: str | None = None,
    timeout_s: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """Send each request at its arrival time; returns the results and the wall time (s)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=None)
    gate = asyncio.Semaphore(max_concurrency or len(requests))
    results = [RequestResult(len(r.prompt), r.output_len) for r in requests]
    url = base_url.rstrip("/") + "/v1/completions"
    async with httpx.AsyncClient(headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout_s)) as client:
        start = time.perf_counter()

        async def one(request: BenchRequest, at: float, result: RequestResult) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            async with gate:
                result.start_s = time.perf_counter() - start
                payload = {"model": model, "prompt": request.prompt,
                           "max_tokens": request.output_len, "temperature": 0.0,
                           "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}
                await _send(client, url, payload, result)

        await asyncio.gather(*(one(r, t, res) for r, t, res in zip(requests, arrivals, results)))
        return results, time.perf_counter() - start


async def _server_model(base_url: str, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=30) as client:
        response = await client.get(base_url.rstrip("/") + "/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]


# ---- report ------------------------------------------------------------------------------


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ms = np.asarray(values) * 1000.0
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99))}


def summarize(
    results: list[RequestResult],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, Any]:
    """The benchmark's numbers; goodput is None unless an SLO is given."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    good = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        def meets(r: RequestResult) -> bool:
            tpot = r.tpot_s
            return ((slo_ttft_ms is None or (r.ttft_s or 0) * 1000 <= slo_ttft_ms)
                    and (slo_tpot_ms is None or tpot is None or tpot * 1000 <= slo_tpot_ms))
        good = sum(1 for r in done if meets(r))
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": sum(r.prompt_len for r in done),
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (output_tokens + sum(r.prompt_len for r in done)) / duration_s,
        "ttft_ms": _stats_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": _stats_ms([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": _stats_ms([x for r in done for x in r.itl_s]),
        "e2e_latency_ms": _stats_ms([r.latency_s for r in done if r.latency_s is not None]),
        "good_requests": good,
        "goodput": None if good is None else good / duration_s,
    }


def print_report(metrics: dict[str, Any]) -> None:
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20)
    rows = [("Successful requests", metrics["completed"]), ("Failed requests", metrics["failed"]),
            ("Benchmark duration (s)", metrics["duration_s"]),
            ("Total input tokens", metrics["total_input_tokens"]),
            ("Total output tokens", metrics["total_output_tokens"]),
            ("Request throughput (req/s)", metrics["request_throughput"]),
            ("Output token throughput (tok/s)", metrics["output_throughput"]),
            ("Total token throughput (tok/s)", metrics["total_token_throughput"])]
    if metrics["goodput"] is not None:
        rows.append(("Request goodput (req/s)", metrics["goodput"]))
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                      ("e2e_latency_ms", "E2E latency")):
        for stat in ("mean", "p50", "p99"):
            rows.append((f"{stat.capitalize()} {name} (ms)", metrics[key][stat]))
    for name, value in rows:
        shown = "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else value)
        print(f"{name:<40}{shown:>12}")
    print("=" * 66)


def plot(results: list[RequestResult], path: Path, title: str) -> None:
    """CDFs of TTFT, TPOT and ITL, and latency against send time."""
    import matplotlib

    matplotlib.use("Agg")  # no display; set before pyplot is imported
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    series = {"TTFT (ms)": [r.ttft_s for r in done if r.ttft_s is not None],
              "TPOT (ms)": [t for r in done if (t := r.tpot_s) is not None],
              "ITL (ms)": [x for r in done for x in r.itl_s]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (name, values) in zip(axes.flat, series.items()):
        ms = np.sort(np.asarray(values) * 1000.0)
        ax.plot(ms, np.arange(1, len(ms) + 1) / max(len(ms), 1), drawstyle="steps-post")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    ax.scatter([r.start_s for r in done], [(r.latency_s or 0) * 1000 for r in done], s=10)
    ax.set_xlabel("sent at (s)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bad_flag(args: argparse.Namespace) -> str | None:
    """What is wrong with the numbers asked for, before any request: `--max-concurrency 0`
    would wait forever for a free slot."""
    for name in ("num_prompts", "random_input_len", "random_output_len", "max_concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if args.request_rate is not None and not args.request_rate > 0:
        return f"--request-rate must be > 0 (inf: all at once), got {args.request_rate}"
    return None


def main(args: argparse.Namespace) -> int:
    """`bench serve`; returns 0 when every request completed."""
    if problem := _bad_flag(args):
        print(f"error: {problem}")
        return 2
    try:
        card = asyncio.run(_server_model(args.url, args.api_key))
    except httpx.HTTPStatusError as e:  # it answered: say what, not "cannot reach"
        hint = " (pass --api-key)" if e.response.status_code == 401 else ""
        print(f"error: {e.request.url} answered HTTP {e.response.status_code}{hint}")
        return 2
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.url}: {e}")
        return 2
    model = args.model or card["id"]
    vocab_size = args.vocab_size or card.get("vocab_size")
    if not vocab_size:
        print("error: the server does not report vocab_size; pass --vocab-size")
        return 2
    rng = random.Random(args.seed)
    if args.trace:
        try:
            requests = trace_requests(Path(args.trace), vocab_size, rng)
        except (OSError, ValueError) as e:
            print(f"error: {e}")
            return 2
    elif None in (args.random_input_len, args.random_output_len, args.num_prompts):
        print("error: give --trace FILE, or --random-input-len, --random-output-len and "
              "--num-prompts")
        return 2
    else:
        requests = random_requests(args.num_prompts, args.random_input_len,
                                   args.random_output_len, vocab_size, rng)
    use_trace_times = args.request_rate is None and all(r.arrival_s is not None for r in requests)
    rate = float("inf") if args.request_rate is None else args.request_rate
    arrivals = ([r.arrival_s or 0.0 for r in requests] if use_trace_times
                else poisson_arrivals(len(requests), rate, rng))
    results, duration = asyncio.run(run_requests(args.url, model, requests, arrivals,
                                                 args.max_concurrency, args.api_key,
                                                 args.timeout_s))
    metrics = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    print_report(metrics)
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "command",
                                                               "bench_command")}
    config.update(model=model, arrivals="trace" if use_trace_times else "poisson")
    Path(args.output_json).write_text(json.dumps(
        {"config": config, "metrics": metrics,
         "requests": [dataclasses.asdict(r) for r in results]}, indent=1))
    plot(results, Path(args.output_png),
         f"{model}: {len(requests)} requests, rate {'trace' if use_trace_times else rate}")
    for r in results:
        if r.error:
            logger.warning("request failed: %s", r.error)
    return 0 if metrics["failed"] == 0 else 1
