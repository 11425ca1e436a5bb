"""StepThreads: the faster measured thread count for each size of step, a bounded share of retries
of the slower one, and the thread count always restored."""

from __future__ import annotations

import pytest
import torch

from infinite_llm.worker import threads as threads_module
from infinite_llm.worker.threads import StepThreads


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(threads_module.time, "perf_counter", fake)
    return fake


def _run(step_threads: StepThreads, clock: _Clock, num_tokens: int,
         seconds: dict[int, float]) -> int:
    """One step that takes `seconds[threads]`; returns the thread count it ran on."""
    with step_threads(num_tokens):
        used = torch.get_num_threads()
        clock.now += seconds[used]
    return used


def test_one_token_steps_are_measured_like_the_rest(clock: _Clock) -> None:
    before = torch.get_num_threads()
    step_threads = StepThreads(2)
    used = [_run(step_threads, clock, 1, {1: 0.1, 2: 0.05}) for _ in range(5)]
    assert used == [1, 2, 2, 2, 2]  # one thread first (nothing measured), then two, which won
    assert torch.get_num_threads() == before


def test_faster_choice_wins_and_slower_is_retried_rarely(clock: _Clock) -> None:
    before = torch.get_num_threads()
    step_threads = StepThreads(2, explore_every=10.0)
    busy = {1: 0.25, 2: 2.0}  # a shared CPU: two threads wait for each other
    used = [_run(step_threads, clock, 32, busy) for _ in range(120)]
    assert used[:2] == [1, 2]  # each measured once
    assert used.count(2) == 2  # retried once in 120 steps: after 10 x 2.0 s on one thread
    assert torch.get_num_threads() == before
    idle = {1: 0.27, 2: 0.18}  # the other work ended: the next retry finds two threads faster
    used = [_run(step_threads, clock, 32, idle) for _ in range(200)]
    assert used[-100:].count(1) <= 100 * 0.18 / (10 * 0.27) + 1  # retries of one thread only


def test_single_thread_budget_touches_nothing(clock: _Clock) -> None:
    before = torch.get_num_threads()
    assert _run(StepThreads(1), clock, 64, {before: 0.1}) == before


def test_new_size_starts_with_the_nearest_sizes_winner(clock: _Clock) -> None:
    step_threads = StepThreads(2)
    idle = {1: 0.27, 2: 0.18}
    assert [_run(step_threads, clock, 32, idle) for _ in range(3)] == [1, 2, 2]
    # A one-off prefill of 1178 tokens: two threads won at 32 tokens, so it starts there.
    assert _run(step_threads, clock, 1178, idle) == 2
    assert _run(step_threads, clock, 1178, idle) == 1  # then one thread, once
    busy = {1: 0.25, 2: 2.0}
    fresh = StepThreads(2)
    assert [_run(fresh, clock, 40, busy) for _ in range(3)] == [1, 2, 1]
    assert _run(fresh, clock, 700, busy) == 1


def test_counts_steps_and_seconds_by_thread_count(clock: _Clock) -> None:
    step_threads = StepThreads(2)
    seconds = {1: 0.25, 2: 0.5}
    used = [_run(step_threads, clock, n, seconds) for n in (1, 32, 32, 32, 1)]
    assert used == [1, 1, 2, 1, 2]  # the last: one token's class has not tried two threads
    assert step_threads.steps == {1: 3, 2: 2}
    assert step_threads.seconds == pytest.approx({1: 0.75, 2: 1.0})
