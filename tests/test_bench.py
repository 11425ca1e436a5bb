"""The serving benchmark's workload and statistics, without a server (the end-to-end runs are in
test_server.py)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from infinite_llm.entrypoints.bench import (
    RequestResult,
    poisson_arrivals,
    random_requests,
    summarize,
    trace_requests,
)


def test_poisson_arrivals_are_seeded_with_the_asked_rate() -> None:
    a = poisson_arrivals(4000, 8.0, random.Random(3))
    assert a == poisson_arrivals(4000, 8.0, random.Random(3))
    assert a[0] == 0.0 and all(x < y for x, y in itertools.pairwise(a))
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8.0, rel=0.05)
    assert poisson_arrivals(3, float("inf"), random.Random(0)) == [0.0, 0.0, 0.0]


def test_random_requests_have_exact_lengths_inside_the_vocab() -> None:
    requests = random_requests(5, 7, 3, 100, random.Random(0))
    assert [len(r.prompt) for r in requests] == [7] * 5
    assert all(0 <= t < 100 for r in requests for t in r.prompt)
    assert {r.output_len for r in requests} == {3}


def test_trace_lines_and_their_errors(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt_len": 3, "output_len": 2, "arrival_s": 0.5, "x": 1}\n\n'
                    '{"prompt_len": 4, "output_len": 1}\n')
    a, b = trace_requests(path, 50, random.Random(0))
    assert (len(a.prompt), a.output_len, a.arrival_s) == (3, 2, 0.5)
    assert (len(b.prompt), b.output_len, b.arrival_s) == (4, 1, None)
    path.write_text(json.dumps({"prompt_len": 3}) + "\n")
    with pytest.raises(ValueError, match=":1: not a trace line"):
        trace_requests(path, 50, random.Random(0))
    path.write_text(json.dumps({"prompt_len": 0, "output_len": 2}) + "\n")
    with pytest.raises(ValueError, match=">= 1"):
        trace_requests(path, 50, random.Random(0))


def _result(ttft: float, latency: float, tokens: int, ok: bool = True) -> RequestResult:
    gap = (latency - ttft) / max(tokens - 1, 1)
    return RequestResult(10, tokens, 0.0, ok, tokens, ttft, latency, [gap] * (tokens - 1))


def test_summary_throughput_percentiles_and_goodput() -> None:
    results = [_result(0.1, 1.0, 10), _result(0.3, 2.1, 10), _result(0.2, 0.2, 1),
               _result(0.0, 0.0, 0, ok=False)]
    m = summarize(results, duration_s=4.0, slo_ttft_ms=250, slo_tpot_ms=150)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_output_tokens"] == 21 and m["output_throughput"] == 21 / 4
    assert m["request_throughput"] == 3 / 4
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert m["tpot_ms"]["mean"] == pytest.approx((100.0 + 200.0) / 2)  # the 1-token one has none
    assert m["e2e_latency_ms"]["p99"] == pytest.approx(1000 + 0.98 * 1100)  # linear, as numpy
    # first: ttft 100 ms, tpot 100 ms -> good; second: ttft 300 ms -> bad; third: no tpot, ok
    assert m["good_requests"] == 2 and m["goodput"] == 2 / 4
    assert summarize(results, 4.0)["goodput"] is None
