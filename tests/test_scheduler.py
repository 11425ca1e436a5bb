"""The scheduler against a block allocator written here with an exact block count.

`FakeAllocator` implements the `BlockAllocator` protocol the way the rManager does for one
instance (a request holds whole blocks for its computed and reserved tokens; a reserve is all or
nothing), so every test can say exactly how many blocks are free before and after a step. The
requests are real `Request`s, advanced after each step as the instance advances them: computed
tokens first, then a sampled token for those that sample, and `Scheduler.finish` for those that
finished.
"""

from __future__ import annotations

from collections import deque

import pytest

from infinite_llm.request import Request, RequestStatus, ScheduledBatch
from infinite_llm.sampling import SamplingParams
from infinite_llm.worker.scheduler import MAX_STALLED_STEPS, Scheduler

TOKEN = 7  # every sampled token; not an end-of-sequence token


class FakeAllocator:
    """`num_free` blocks of `block_size` slots; a request holds whole blocks until freed."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_free = num_blocks
        self.held: dict[str, int] = {}
        self.freed: list[str] = []  # request ids, in the order they were freed

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - self.held.get(request.request_id, 0))

    def reserve(self, request: Request, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(request, num_new_tokens)
        if needed > self.num_free:
            return False
        self.num_free -= needed
        self.held[request.request_id] = self.held.get(request.request_id, 0) + needed
        return True

    def free(self, request: Request) -> None:
        self.num_free += self.held.pop(request.request_id, 0)
        self.freed.append(request.request_id)

    def available_blocks(self) -> int:
        return self.num_free

    def lease(self, num_blocks: int) -> None:
        """Room on another instance arrives: the instance can take more blocks."""
        self.num_free += num_blocks


def make_request(request_id: str, prompt_len: int, max_tokens: int = 100) -> Request:
    return Request(request_id, list(range(prompt_len)), SamplingParams(), max_tokens,
                   frozenset())


def advance(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    """What the instance does after the step's forward and sampling."""
    for request, n, samples in zip(batch.requests, batch.num_tokens, batch.samples):
        request.num_computed_tokens += n
        if samples:
            request.append_token(TOKEN)
            if request.is_finished:
                scheduler.finish(request)


def step(scheduler: Scheduler, **kwargs: object) -> ScheduledBatch:
    batch = scheduler.schedule(**kwargs)
    advance(scheduler, batch)
    return batch


def batch(requests: tuple[Request, ...], starts: tuple[int, ...], num_tokens: tuple[int, ...],
          samples: tuple[bool, ...]) -> ScheduledBatch:
    return ScheduledBatch(requests, starts, num_tokens, samples)


def test_a_long_prompt_is_prefilled_in_chunks_then_decodes() -> None:
    blocks = FakeAllocator(100, block_size=4)
    scheduler = Scheduler(blocks, max_num_batched_tokens=4, max_num_seqs=4)
    a = make_request("a", 10, max_tokens=3)
    scheduler.add(a)

    for start, num_tokens, samples, held in [(0, 4, False, 1), (4, 4, False, 2),
                                             (8, 2, True, 3), (10, 1, True, 3)]:
        assert step(scheduler) == batch((a,), (start,), (num_tokens,), (samples,))
        assert blocks.held == {"a": held}
    assert step(scheduler) == batch((a,), (11,), (1,), (True,))
    assert a.output_token_ids == [TOKEN] * 3 and a.is_finished
    assert (scheduler.running, scheduler.waiting) == ([], deque())
    assert (blocks.num_free, blocks.freed) == (100, ["a"])


def test_the_budget_goes_to_decodes_then_to_a_prefill_chunk() -> None:
    scheduler = Scheduler(FakeAllocator(100, block_size=4), max_num_batched_tokens=8,
                          max_num_seqs=4)
    a, b, c = make_request("a", 3), make_request("b", 3), make_request("c", 20)
    scheduler.add(a)
    scheduler.add(b)
    assert step(scheduler) == batch((a, b), (0, 0), (3, 3), (True, True))
    scheduler.add(c)

    assert step(scheduler) == batch((a, b, c), (3, 3, 0), (1, 1, 6), (True, True, False))
    assert step(scheduler) == batch((a, b, c), (4, 4, 6), (1, 1, 6), (True, True, False))
    assert step(scheduler) == batch((a, b, c), (5, 5, 12), (1, 1, 6), (True, True, False))
    last = step(scheduler)
    assert last == batch((a, b, c), (6, 6, 18), (1, 1, 2), (True, True, True))
    assert (last.total_tokens, last.sampling) == (4, (a, b, c))


def test_at_most_max_num_seqs_run() -> None:
    scheduler = Scheduler(FakeAllocator(100, block_size=4), max_num_batched_tokens=100,
                          max_num_seqs=2)
    a, b, c = make_request("a", 2, max_tokens=1), make_request("b", 2), make_request("c", 2)
    for request in (a, b, c):
        scheduler.add(request)

    assert step(scheduler) == batch((a, b), (0, 0), (2, 2), (True, True))
    assert a.is_finished and list(scheduler.waiting) == [c]
    assert step(scheduler) == batch((b, c), (2, 0), (1, 2), (True, True))


@pytest.mark.parametrize(("num_blocks", "admitted"), [(5, False), (6, True)])
def test_a_request_is_admitted_only_when_its_whole_prompt_and_headroom_fit(
        num_blocks: int, admitted: bool) -> None:
    """After `r` reserves its next block, `w` needs 3 blocks for its whole prompt and `r` one
    block of headroom: 4 free blocks admit `w` (for a 3-token chunk, one block), 3 don't, and
    `x` behind it waits its turn although it would fit."""
    blocks = FakeAllocator(num_blocks, block_size=4)
    scheduler = Scheduler(blocks, max_num_batched_tokens=4, max_num_seqs=4)
    r, w, x = make_request("r", 4), make_request("w", 9), make_request("x", 1)
    scheduler.add(r)
    assert step(scheduler) == batch((r,), (0,), (4,), (True,))
    scheduler.add(w)
    scheduler.add(x)

    if admitted:
        assert step(scheduler) == batch((r, w), (4, 0), (1, 3), (True, False))
        assert (blocks.held, blocks.num_free) == ({"r": 2, "w": 1}, 3)
        assert w.status is RequestStatus.RUNNING and list(scheduler.waiting) == [x]
    else:
        assert step(scheduler) == batch((r,), (4,), (1,), (True,))
        assert (blocks.held, blocks.num_free) == ({"r": 2}, 3)
        assert w.status is RequestStatus.WAITING and list(scheduler.waiting) == [w, x]


def test_the_senior_request_is_admitted_without_headroom() -> None:
    blocks = FakeAllocator(5, block_size=4)
    scheduler = Scheduler(blocks, max_num_batched_tokens=4, max_num_seqs=4)
    r, w = make_request("r", 4), make_request("w", 9)
    scheduler.add(r)
    step(scheduler)
    scheduler.add(w)

    assert step(scheduler, senior="w") == batch((r, w), (4, 0), (1, 3), (True, False))
    assert blocks.held == {"r": 2, "w": 1}


def three_decoding(num_blocks: int = 6) -> tuple[Scheduler, FakeAllocator, tuple[Request, ...]]:
    """a, b, c (2-token prompts, 2-token blocks) decoding, each holding 2 blocks and about to
    need a third, with `num_blocks - 6` blocks free."""
    blocks = FakeAllocator(num_blocks, block_size=2)
    scheduler = Scheduler(blocks, max_num_batched_tokens=100, max_num_seqs=4)
    requests = tuple(make_request(name, 2) for name in "abc")
    for request in requests:
        scheduler.add(request)
    assert step(scheduler) == batch(requests, (0, 0, 0), (2, 2, 2), (True,) * 3)
    assert step(scheduler) == batch(requests, (2, 2, 2), (1, 1, 1), (True,) * 3)
    assert step(scheduler) == batch(requests, (3, 3, 3), (1, 1, 1), (True,) * 3)
    assert (blocks.num_free, blocks.held) == (num_blocks - 6, {"a": 2, "b": 2, "c": 2})
    return scheduler, blocks, requests


def assert_preempted(request: Request, scheduler: Scheduler) -> None:
    assert request.status is RequestStatus.WAITING
    assert (request.num_computed_tokens, request.num_preemptions) == (0, 1)
    assert request.num_tokens == 5  # its prompt and outputs, all to be computed again
    assert scheduler.waiting[0] is request and request not in scheduler.running


def test_the_newest_running_request_is_preempted_first() -> None:
    scheduler, blocks, (a, b, c) = three_decoding()

    assert step(scheduler) == batch((a, b), (4, 4), (1, 1), (True, True))
    assert_preempted(c, scheduler)
    assert (scheduler.num_preemptions, blocks.freed) == (1, ["c"])
    assert (blocks.num_free, blocks.held) == (0, {"a": 3, "b": 3})
    # c, to compute its 5 tokens again, needs 3 blocks and none is free: it waits.
    assert step(scheduler) == batch((a, b), (5, 5), (1, 1), (True, True))
    assert list(scheduler.waiting) == [c]


def test_no_request_is_admitted_in_a_step_that_preempted() -> None:
    """Not even the senior one, which needs no headroom: b preempts c for its block, one block
    is left, and s waits for the next step."""
    scheduler, blocks, (a, b, c) = three_decoding(num_blocks=7)
    s = make_request("s", 1)
    scheduler.add(s)

    assert step(scheduler, senior="s") == batch((a, b), (4, 4), (1, 1), (True, True))
    assert (list(scheduler.waiting), c.num_preemptions, blocks.num_free) == ([s, c], 1, 1)
    assert step(scheduler, senior="s") == batch((a, b, s), (5, 5, 0), (1, 1, 1), (True,) * 3)
    assert list(scheduler.waiting) == [c]


def test_a_request_preempts_itself_when_nobody_is_behind_it() -> None:
    blocks = FakeAllocator(2, block_size=2)
    scheduler = Scheduler(blocks, max_num_batched_tokens=100, max_num_seqs=4)
    x = make_request("x", 3)
    scheduler.add(x)
    assert step(scheduler) == batch((x,), (0,), (3,), (True,))
    assert step(scheduler) == batch((x,), (3,), (1,), (True,))

    assert step(scheduler) == ScheduledBatch()
    assert_preempted(x, scheduler)
    assert (blocks.num_free, blocks.freed, scheduler.running) == (2, ["x"], [])


def test_the_senior_request_goes_first_and_the_one_behind_it_is_preempted() -> None:
    scheduler, blocks, (a, b, c) = three_decoding()

    assert step(scheduler, senior="c") == batch((c, a), (4, 4), (1, 1), (True, True))
    assert_preempted(b, scheduler)
    assert blocks.held == {"a": 3, "c": 3}


def test_the_senior_request_stalls_instead_of_preempting_itself() -> None:
    blocks = FakeAllocator(2, block_size=2)
    scheduler = Scheduler(blocks, max_num_batched_tokens=100, max_num_seqs=4)
    x = make_request("x", 3)
    scheduler.add(x)
    step(scheduler, senior="x")
    step(scheduler, senior="x")

    for stalled in range(1, MAX_STALLED_STEPS + 3):
        assert step(scheduler, senior="x") == ScheduledBatch()
        assert (x.num_stalled_steps, scheduler.num_stalled) == (stalled, 1)
        assert scheduler.running == [x] and blocks.held == {"x": 2}
    assert scheduler.num_preemptions == 0 and x.num_preemptions == 0
    blocks.lease(1)
    assert step(scheduler, senior="x") == batch((x,), (4,), (1,), (True,))
    assert (x.num_stalled_steps, scheduler.num_stalled, blocks.held) == (0, 0, {"x": 3})


def test_with_can_borrow_requests_stall_for_at_most_max_stalled_steps() -> None:
    scheduler, blocks, (a, b, c) = three_decoding()

    for stalled in range(1, MAX_STALLED_STEPS + 1):
        assert step(scheduler, can_borrow=True) == ScheduledBatch()
        assert [r.num_stalled_steps for r in (a, b, c)] == [stalled] * 3
        assert scheduler.num_stalled == 3 and scheduler.running == [a, b, c]
    assert scheduler.num_preemptions == 0 and blocks.held == {"a": 2, "b": 2, "c": 2}

    assert step(scheduler, can_borrow=True) == batch((a, b), (4, 4), (1, 1), (True, True))
    assert_preempted(c, scheduler)
    assert [r.num_stalled_steps for r in (a, b)] == [0, 0]
    assert scheduler.num_stalled == 0 and blocks.held == {"a": 3, "b": 3}


def test_decode_ahead_reserves_the_next_decode_step() -> None:
    blocks = FakeAllocator(4, block_size=2)
    scheduler = Scheduler(blocks, max_num_batched_tokens=100, max_num_seqs=4)
    a, b = make_request("a", 2), make_request("b", 2)
    scheduler.add(a)
    scheduler.add(b)
    first = step(scheduler)
    assert blocks.num_free == 2

    ahead = scheduler.decode_ahead(first)

    assert ahead == batch((a, b), (2, 2), (1, 1), (True, True))
    assert (blocks.num_free, blocks.held) == (0, {"a": 2, "b": 2})
    chosen = scheduler.schedule()
    assert chosen == ahead and ahead.is_decode_of(chosen)
    assert blocks.num_free == 0


def test_decode_ahead_declines_a_batch_that_does_not_decode_on() -> None:
    scheduler = Scheduler(FakeAllocator(100, block_size=2), max_num_batched_tokens=3,
                          max_num_seqs=4)
    a, b = make_request("a", 2), make_request("b", 2)
    scheduler.add(a)
    scheduler.add(b)
    chunked = step(scheduler)

    assert chunked == batch((a, b), (0, 0), (2, 1), (True, False))
    assert scheduler.decode_ahead(chunked) is None
    assert scheduler.decode_ahead(ScheduledBatch()) is None


def test_decode_ahead_reserves_all_or_nothing_and_only_while_nobody_waits() -> None:
    blocks = FakeAllocator(3, block_size=2)
    scheduler = Scheduler(blocks, max_num_batched_tokens=100, max_num_seqs=4)
    a, b = make_request("a", 2), make_request("b", 2)
    scheduler.add(a)
    scheduler.add(b)
    first = step(scheduler)

    # a and b each need a second block and one is free: nothing is reserved, not even one.
    assert scheduler.decode_ahead(first) is None
    assert (blocks.num_free, blocks.held) == (1, {"a": 1, "b": 1})
    blocks.lease(1)
    c = make_request("c", 1)
    scheduler.add(c)  # the next step may admit c
    assert scheduler.decode_ahead(first) is None
    assert blocks.num_free == 2
    scheduler.finish(c)
    assert scheduler.decode_ahead(first) == batch((a, b), (2, 2), (1, 1), (True, True))
    assert blocks.num_free == 0


def test_finish_drops_a_request_from_either_queue_and_frees_its_blocks() -> None:
    blocks = FakeAllocator(4, block_size=2)
    scheduler = Scheduler(blocks, max_num_batched_tokens=100, max_num_seqs=1)
    a, b = make_request("a", 3), make_request("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert (scheduler.running, list(scheduler.waiting), blocks.num_free) == ([a], [b], 2)

    scheduler.finish(b)
    scheduler.finish(a)
    assert (scheduler.running, list(scheduler.waiting)) == ([], [])
    assert (scheduler.num_unfinished, blocks.num_free, blocks.freed) == (0, 4, ["b", "a"])
