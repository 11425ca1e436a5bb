"""Continuous batching with chunked prefill and preemption by recompute, for one instance.

The scheduler speaks in token counts: each running request wants its uncomputed tokens (a whole
or partial prompt, or the one token sampled last step), and a step's batch gives each request a
share of the token budget. Running requests go first, the cluster's oldest (`senior`) before the
rest, then in order; when the rManager has no block for one, the most recently admitted request
behind it is preempted (its KV freed, recomputed later), or it preempts itself if none is.
The senior request is never preempted: with none behind it, it waits for blocks (the gManager
lends its owner first), so two requests too large to run together can't preempt each other
forever. Waiting requests are admitted only in steps without preemption, while budget and
seats remain, and only while the blocks this instance can take now (free and leased) cover the
newcomer's whole remaining prompt, the unheld rest of running prefills and one block of decode
growth per running request (the headroom vLLM keeps with its watermark): a request admitted on
its first chunk alone would be preempted a few chunks later, its work thrown away.
The scheduler moves requests between queues; the block allocator (`RManager`, or the
simulator's ledger) owns their blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from infinite_llm.kvcache.allocator import BlockAllocator
from infinite_llm.request import Request, RequestStatus, ScheduledBatch


def senior_first(requests: Iterable[Request], senior: str | None) -> list[Request]:
    """The requests with the cluster's senior one (if among them) moved to the front, the rest
    in order."""
    requests = list(requests)
    head = [r for r in requests if r.request_id == senior]
    return head + [r for r in requests if r.request_id != senior] if head else requests


MAX_STALLED_STEPS = 4


@dataclass(frozen=True, slots=True)
class QueueLoad:
    """An instance's queues after a step: the heartbeat's load fields."""

    num_running: int
    num_waiting: int
    prefill_tokens: int  # tokens of running requests that no KV slot holds yet
    waiting_tokens: int  # tokens to compute for the whole waiting queue
    head_tokens: int  # tokens to compute for the first waiting request
    num_stalled: int  # running requests that found no block in the last step


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_batched_tokens: int,
                 max_num_seqs: int) -> None:
        self.allocator = allocator
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_stalled = 0  # running requests that found no block in the last step

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self, can_borrow: bool = False, senior: str | None = None) -> ScheduledBatch:
        """The step's batch. With `can_borrow` (another instance has spare blocks), a running
        request that finds no block waits for the lease the gManager grants from this
        instance's heartbeat instead of preempting anyone, for at most MAX_STALLED_STEPS steps
        in a row (the gManager may keep the blocks for their owner's own queue). The `senior`
        request (by id) goes first and waits as long as it takes."""
        requests: list[Request] = []
        num_tokens: list[int] = []
        budget = self.max_num_batched_tokens
        self.num_stalled = 0
        preempted = False
        queue = deque(senior_first(self.running, senior))
        self.running = []
        while queue and budget > 0:
            request = queue.popleft()
            n = min(request.num_uncomputed_tokens, budget)
            while not self.allocator.reserve(request, n):
                waits = can_borrow and request.num_stalled_steps < MAX_STALLED_STEPS
                if waits or (request.request_id == senior and not queue):  # senior: no self-preempt
                    request.num_stalled_steps += 1
                    self.num_stalled += 1
                    self.running.append(request)
                    break
                if not queue:  # nobody left to preempt but itself
                    self._preempt(request)
                    preempted = True
                    break
                self._preempt(queue.pop())
                preempted = True
            else:
                request.num_stalled_steps = 0
                self.running.append(request)
                requests.append(request)
                num_tokens.append(n)
                budget -= n
        self.running.extend(queue)  # not reached for budget: they keep their place
        self.waiting = deque(senior_first(self.waiting, senior))
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.max_num_seqs:
                break
            request = self.waiting[0]
            n = min(request.num_uncomputed_tokens, budget)
            if request.request_id != senior and not self._fits(request):
                break
            if not self.allocator.reserve(request, n):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            requests.append(request)
            num_tokens.append(n)
            budget -= n
        return ScheduledBatch.of(requests, num_tokens)

    def load(self, block_size: int) -> QueueLoad:
        """The queues as the gManager sees them after a step."""
        running, waiting = self.running, self.waiting
        unheld = sum(max(0, r.num_tokens - block_size * sum(s.num_blocks for s in r.segments))
                     for r in running)
        return QueueLoad(len(running), len(waiting), unheld,
                         sum(r.num_tokens for r in waiting),
                         waiting[0].num_tokens if waiting else 0, self.num_stalled)

    def decode_ahead(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The step after `batch` if every request of it decodes on: each computes the token
        `batch` sampled (on the device, not yet known to the host) at the position after
        `batch`'s, its slot reserved now, as `schedule` would reserve it. Called once the
        requests' counters have advanced past `batch`. None when the next `schedule` may pick
        other work: a request waits for admission, a request of `batch` does not sample, or
        the blocks run short. Async scheduling queues this step before `schedule` runs."""
        if self.waiting or not batch.requests or not all(batch.samples):
            return None
        requests = batch.requests
        if sum(self.allocator.blocks_needed(r, 1) for r in requests) \
                > self.allocator.available_blocks():
            return None
        for request in requests:
            self.allocator.reserve(request, 1)
        n = len(requests)
        return ScheduledBatch(requests, tuple(r.num_computed_tokens for r in requests),
                              (1,) * n, (True,) * n)

    def _fits(self, request: Request) -> bool:
        """Whether the blocks this instance can take now cover the request's whole remaining
        prompt, what running requests still need for theirs, and a block per running request
        for its next decodes."""
        blocks = self.allocator
        committed = sum(blocks.blocks_needed(r, r.num_uncomputed_tokens) + 1 for r in self.running)
        return blocks.blocks_needed(request, request.num_uncomputed_tokens) + committed \
            <= blocks.available_blocks()

    def _preempt(self, request: Request) -> None:
        self.allocator.free(request)
        request.reset_for_recompute()
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request from the queues and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.allocator.free(request)
