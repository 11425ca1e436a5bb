"""Prometheus metrics of a serving engine, in a registry of their own.

Each server owns one `EngineMetrics` (its own `CollectorRegistry`, never the process-global one),
so two engines in one process, as in tests, do not clash. Everything is written from the engine
thread after a step or a request's end, and read by `/metrics` from the event loop; the
prometheus client's values are thread-safe.

Names follow vLLM's where one exists (`time_to_first_token_seconds`, ...) under the
`infinite_llm_` prefix; KV blocks are gauges labelled by `instance`, so the pool's accounting
`free + own + lent == total` can be checked from outside.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from infinite_llm.kvcache.rmanager import KVStats

PREFIX = "infinite_llm"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds; TTFT and latency spread from a few ms (a tiny model, idle) to minutes (a long queue).
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 10.0)
KV_FIELDS = ("total", "free", "own", "lent", "borrowed")


class EngineMetrics:
    """The server's metrics; `render()` gives the text exposition for `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Time from a request's arrival to its first output token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Per finished request: (latency - TTFT) / (output tokens - 1).",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds",
                             "Time from a request's arrival to its end.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge(f"{PREFIX}_num_requests_running",
                             "Requests that have produced a token and are not finished.",
                             registry=r)
        self.waiting = Gauge(f"{PREFIX}_num_requests_waiting",
                             "Requests accepted that have not produced a token yet "
                             "(queued or in prefill).", registry=r)
        self.preemptions = Counter(f"{PREFIX}_num_preemptions",
                                   "Requests preempted (KV freed, recomputed later).", registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens",
                                     "Prompt tokens of requests that produced a token.",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens",
                                         "Output tokens generated.", registry=r)
        self.finished = Counter(f"{PREFIX}_request_finished",
                                "Requests ended, by finish reason (stop, length, abort).",
                                ["finish_reason"], registry=r)
        self.kv_blocks = {
            name: Gauge(f"{PREFIX}_kv_blocks_{name}", f"KV blocks {name} on each instance.",
                        ["instance"], registry=r)
            for name in KV_FIELDS
        }
        self._preemptions_seen = 0

    def observe_engine(
        self, kv: Sequence[KVStats], num_preemptions: int, running: int, waiting: int
    ) -> None:
        """The engine's state after a step (or an abort): block gauges, queue sizes."""
        for instance, stats in enumerate(kv):
            for name, gauge in self.kv_blocks.items():
                gauge.labels(instance=str(instance)).set(getattr(stats, name))
        if num_preemptions > self._preemptions_seen:  # the engine's count is cumulative
            self.preemptions.inc(num_preemptions - self._preemptions_seen)
            self._preemptions_seen = num_preemptions
        self.running.set(running)
        self.waiting.set(waiting)

    def observe_first_token(self, ttft_s: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.prompt_tokens.inc(num_prompt_tokens)

    def observe_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def observe_finished(
        self, finish_reason: str, e2e_s: float, ttft_s: float | None, num_output_tokens: int
    ) -> None:
        self.finished.labels(finish_reason=finish_reason).inc()
        self.e2e.observe(e2e_s)
        if ttft_s is not None and num_output_tokens > 1:
            self.tpot.observe((e2e_s - ttft_s) / (num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
