"""rManager: the owner of one instance's KV blocks and their exact accounting.

Every block of the pool is in exactly one state: free, *own* (holding KV of a request this
instance owns) or *lent* (holding KV of a request owned by another instance). Blocks a request
of ours keeps on other instances are *borrowed*; they are counted here and in the creditor's lent.
Invariant after every call: `free + own + lent == total`. Nobody else touches the pool's free list.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinite_llm.kvcache.pool import KVPool
from infinite_llm.request import Request, Segment


@dataclass(frozen=True, slots=True)
class KVStats:
    """Block counts of one instance."""

    total: int
    free: int
    own: int
    lent: int
    borrowed: int


class RManager:
    def __init__(self, pool: KVPool, instance: int) -> None:
        self.pool = pool
        self.instance = instance
        self._own: dict[str, int] = {}  # request id -> blocks of this pool holding its KV
        self._lent = 0
        self._borrowed = 0

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """More blocks the request needs so that its next `num_new_tokens` tokens have slots."""
        held = sum(len(s.blocks) for s in request.segments)
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - held)

    def reserve(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request slots for its next `num_new_tokens` tokens; False if none are left.

        New blocks extend the request's tail segment when it is here, else start a new segment.
        """
        needed = self.blocks_needed(request, num_new_tokens)
        if needed == 0:
            return True
        if needed > self.pool.num_free:
            return False
        blocks = self.pool.allocate(needed)
        tail = request.segments[-1] if request.segments else None
        if tail is not None and tail.instance == self.instance:
            tail.blocks.extend(blocks)
        else:
            start = sum(len(s.blocks) for s in request.segments) * self.block_size
            request.segments.append(Segment(self.instance, start, blocks))
        self._own[request.request_id] = self._own.get(request.request_id, 0) + needed
        return True

    def free(self, request: Request) -> None:
        """Return every block of the request to the free list and clear its segments."""
        for segment in request.segments:
            self.pool.free(segment.blocks)
        self._own.pop(request.request_id, None)
        request.segments.clear()

    def stats(self) -> KVStats:
        return KVStats(
            total=self.pool.num_blocks,
            free=self.pool.num_free,
            own=sum(self._own.values()),
            lent=self._lent,
            borrowed=self._borrowed,
        )
