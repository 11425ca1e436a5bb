"""What a run achieved, the pooled-vs-static table, and the plots (matplotlib, Agg backend).

Throughput counts the output tokens (and requests) of finished requests over the makespan, from
the first arrival to the last finish; `all` adds their prompt tokens, the work done, which
differs between modes when one rejects what the other serves. On a finite trace the makespan
ends in a tail of a few slow requests, so `window` throughput also counts the output tokens
sampled while requests still arrive, over that window: the rate sustained under the load.

TTFT is first token minus arrival; TPOT is (finish - first token) / (output tokens - 1), over
requests with more than one output token. Rejected requests count in `rejected` and its ratio
to all requests, not in latencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from infinite_llm.sim.cluster import SimResult
from infinite_llm.sim.request import Status


@dataclass(frozen=True, slots=True)
class Metrics:
    mode: str
    instances: int
    requests: int
    finished: int
    rejected: int
    output_tokens_per_s: float
    window_tokens_per_s: float
    served_tokens_per_s: float  # prompt and output tokens of finished requests
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    preemptions: int
    leases: int
    leased_blocks: int
    migrations: int
    sim_s: float  # simulated makespan
    wall_s: float  # time the simulation itself took
    # Lockstep only (0 otherwise), defined as `benchmarks/pooled_vs_static.py` prints them:
    steps: int = 0
    output_tokens_per_step: float = 0.0
    exchange_steps: int = 0
    free_while_waiting: float = 0.0  # mean free fraction of all KV while requests waited
    free_beside_queue: float = 0.0  # the part of it on instances that had a queue themselves
    blocked_share: float = 0.0  # instance-steps whose queue head needed more than they had

    @property
    def rejected_ratio(self) -> float:
        return self.rejected / self.requests if self.requests else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def metrics(result: SimResult) -> Metrics:
    reqs = result.requests
    done = [r for r in reqs if r.status is Status.FINISHED]
    rejected = sum(r.status is Status.REJECTED for r in reqs)
    start = min((r.arrival_s for r in reqs), default=0.0)
    end = max((r.finish_s for r in done if r.finish_s is not None), default=start)
    span = max(end - start, 1e-9)
    ttft = [r.first_token_s - r.arrival_s for r in done if r.first_token_s is not None]
    tpot = [(r.finish_s - r.first_token_s) / (r.output_len - 1) for r in done
            if r.output_len > 1 and r.finish_s is not None and r.first_token_s is not None]
    return Metrics(
        mode=result.config.mode, instances=result.config.num_instances, requests=len(reqs),
        finished=len(done), rejected=rejected,
        output_tokens_per_s=sum(r.output_len for r in done) / span,
        served_tokens_per_s=sum(r.prompt_len + r.output_len for r in done) / span,
        window_tokens_per_s=(result.window_tokens / result.window_s if result.window_s > 0
                             else float("nan")),
        requests_per_s=len(done) / span,
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        tpot_p50_s=percentile(tpot, 50), tpot_p99_s=percentile(tpot, 99),
        preemptions=result.num_preemptions, leases=result.num_leases,
        leased_blocks=result.leased_blocks,
        migrations=result.num_migrations, sim_s=span, wall_s=result.wall_s,
        steps=result.num_steps,
        output_tokens_per_step=sum(r.output_len for r in done) / max(1, result.num_steps),
        exchange_steps=result.exchange_steps,
        free_while_waiting=result.free_while_waiting / max(1, result.waiting_steps),
        free_beside_queue=result.free_beside_queue / max(1, result.waiting_steps),
        blocked_share=result.blocked / max(1, result.num_steps))


_HEADER = (f"{'inst':>5} {'mode':<6} {'reqs':>6} {'rejected':>12} {'out tok/s':>10} "
           f"{'win tok/s':>10} {'all tok/s':>10} {'req/s':>8} {'TTFT p50':>8} {'TTFT p99':>8} "
           f"{'TPOT p50':>8} {'TPOT p99':>8} {'preempt':>7} {'leases':>7} {'migr':>5} "
           f"{'wall':>6} {'ratio':>6}")


def table(rows: Sequence[Metrics]) -> str:
    """One line per run; `ratio` is pooled over static output tokens/s at the same size."""
    static = {m.instances: m for m in rows if m.mode == "static"}
    lines = [_HEADER]
    for m in rows:
        base = static.get(m.instances)
        ratio = (f"{m.output_tokens_per_s / base.output_tokens_per_s:.2f}x"
                 if m.mode == "pooled" and base and base.output_tokens_per_s > 0 else "")
        rej = f"{m.rejected} ({m.rejected_ratio:.1%})"
        lines.append(
            f"{m.instances:>5} {m.mode:<6} {m.requests:>6} {rej:>12} "
            f"{m.output_tokens_per_s:>10.0f} {m.window_tokens_per_s:>10.0f} "
            f"{m.served_tokens_per_s:>10.0f} "
            f"{m.requests_per_s:>8.1f} {m.ttft_p50_s * 1e3:>6.0f}ms {m.ttft_p99_s * 1e3:>6.0f}ms "
            f"{m.tpot_p50_s * 1e3:>6.1f}ms {m.tpot_p99_s * 1e3:>6.1f}ms {m.preemptions:>7} "
            f"{m.leases:>7} {m.migrations:>5} {m.wall_s:>5.1f}s {ratio:>6}".rstrip())
    return "\n".join(lines)


def memory_table(rows: Sequence[Metrics]) -> str:
    """Where the lockstep runs' steps and memory went: output tokens per step, steps that
    exchanged, free KV while requests waited (all of it, and the part on instances whose own
    queue waited: stranded beside a head that doesn't fit), and how often a head didn't fit."""
    lines = [f"{'inst':>5} {'mode':<6} {'steps':>7} {'tok/step':>8} {'exch':>7} "
             f"{'free/wait':>9} {'beside queue':>12} {'head blocked':>12}"]
    for m in rows:
        lines.append(f"{m.instances:>5} {m.mode:<6} {m.steps:>7} {m.output_tokens_per_step:>8.2f} "
                     f"{m.exchange_steps:>7} {m.free_while_waiting:>9.0%} "
                     f"{m.free_beside_queue:>12.0%} {m.blocked_share:>12.0%}")
    return "\n".join(lines)


def plot(rows: Sequence[Metrics], out_dir: str | Path, title: str = "") -> list[Path]:
    """Throughput, latency and rejections against cluster size, pooled vs static, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    series = {  # panel title -> [(label suffix, value, line style)]
        "output tokens/s per instance": [
            ("makespan", lambda m: m.output_tokens_per_s / m.instances, "o-"),
            ("window", lambda m: m.window_tokens_per_s / m.instances, "s:")],
        "TTFT (s)": [("p50", lambda m: m.ttft_p50_s, "o-"), ("p99", lambda m: m.ttft_p99_s, "s--")],
        "TPOT (ms)": [("p50", lambda m: m.tpot_p50_s * 1e3, "o-"),
                      ("p99", lambda m: m.tpot_p99_s * 1e3, "s--")],
        "rejected requests (%)": [("", lambda m: 100 * m.rejected_ratio, "o-")],
    }
    for ax, (panel, lines) in zip(axes.flat, series.items()):
        for mode, color in (("pooled", "tab:blue"), ("static", "tab:orange")):
            ms = sorted((m for m in rows if m.mode == mode), key=lambda m: m.instances)
            for suffix, value, style in lines:
                ax.plot([m.instances for m in ms], [value(m) for m in ms], style, color=color,
                        label=f"{mode} {suffix}".strip())
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("instances")
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "sim_pooled_vs_static.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
