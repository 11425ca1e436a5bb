"""How many CPU threads an engine step runs on, chosen by timing the steps themselves.

On an idle CPU a step of many tokens runs faster on every core: its matmuls are compute-bound.
On a CPU that other processes use too, each op that enters an OpenMP parallel region waits until
all of its threads get a core, so the same step can run several times slower on two threads than
on one (2 shared cores at load average ~4: a batch-32 step's linears took 1.9 s on two threads,
0.2 s on one; at ~2, 0.18 s on two and 0.27 s on one). Which case holds changes while the engine
runs, so `StepThreads` measures instead of guessing.

Invariants: a step of a size class not seen yet runs first on what won for the nearest class
measured both ways, then on the other choice once. After that, steps run on whichever of one
thread or all threads has the lower recent seconds per token for their size class; the other is
retried once the time spent since its last try reaches `explore_every` times its expected cost,
so trying the slower choice costs at most about 1 / explore_every of the time. One-token steps
are measured like the rest: with oneDNN's packed weights (`models.layers.Linear`) their products run
faster on two idle cores than on one (`benchmarks/throughput.py --linears`). The thread count is
restored after every step.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SMOOTHING = 0.5  # weight of a step's seconds per token in its choice's running estimate


class StepThreads:
    """`with step_threads(num_tokens):` runs one step on the thread count chosen for it."""

    def __init__(self, max_threads: int, explore_every: float = 10.0) -> None:
        self.max_threads = max_threads  # 1: nothing to choose (GPU steps, or a 1-core share)
        self.explore_every = explore_every
        self._cost: dict[tuple[int, int], float] = {}  # (size class, threads) -> s per token
        self._since: dict[int, float] = {}  # size class -> seconds since the other was tried
        # For reports: steps run on each thread count, and their seconds.
        self.steps: Counter[int] = Counter()
        self.seconds: defaultdict[int, float] = defaultdict(float)

    @contextmanager
    def __call__(self, num_tokens: int) -> Iterator[None]:
        if self.max_threads == 1 or num_tokens < 1:
            yield
            return
        threads, exploring = self._choose(num_tokens)
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        start = time.perf_counter()
        try:
            yield
        finally:
            torch.set_num_threads(saved)
        seconds = time.perf_counter() - start
        self.steps[threads] += 1
        self.seconds[threads] += seconds
        self._record(num_tokens, threads, exploring, seconds)

    def _choose(self, num_tokens: int) -> tuple[int, bool]:
        """(threads, whether that is a retry of the choice measured slower)."""
        size = num_tokens.bit_length()
        untried = [t for t in (1, self.max_threads) if (size, t) not in self._cost]
        if len(untried) == 2:  # a new size: first what won for the nearest measured size
            return self._nearest_winner(size), False
        if untried:  # then the other, once
            return untried[0], False
        one, many = self._cost[size, 1], self._cost[size, self.max_threads]
        best, other = (1, self.max_threads) if one <= many else (self.max_threads, 1)
        expected = self._cost[size, other] * num_tokens
        if self._since.get(size, 0.0) >= self.explore_every * expected:
            return other, True
        return best, False

    def _nearest_winner(self, size: int) -> int:
        """The faster thread count of the nearest size class measured both ways (one thread if
        none is): a size seen once, like a big prefill, still gets the better guess."""
        both = [c for c in {c for c, _ in self._cost}
                if (c, 1) in self._cost and (c, self.max_threads) in self._cost]
        if not both:
            return 1
        nearest = min(both, key=lambda c: (abs(c - size), -c))
        return 1 if self._cost[nearest, 1] <= self._cost[nearest, self.max_threads] \
            else self.max_threads

    def _record(self, num_tokens: int, threads: int, exploring: bool, seconds: float) -> None:
        size = num_tokens.bit_length()
        per_token = seconds / num_tokens
        old = self._cost.get((size, threads))
        # A retry's measurement replaces the old one: that is from before the CPU's load changed.
        self._cost[size, threads] = (
            per_token if old is None or exploring else old + _SMOOTHING * (per_token - old))
        self._since[size] = 0.0 if exploring else self._since.get(size, 0.0) + seconds
