"""rManager: the owner of one instance's KV blocks and their exact accounting.

Every block of the pool is in exactly one state: free, *own* (holding KV of a request this
instance owns) or *lent* (set aside for a debtor under a lease, or holding KV of a request owned
by another instance). Blocks that requests of ours keep on other instances are *borrowed*.
Invariant after every call: `free + own + lent == total`. Nobody else touches the pool's free list.

Lending works by leases, each good for one step. A lease (debtor D, creditor C, n) makes C set n
free blocks aside for D and gives D room for n blocks on C; D then places KV there without asking
(C learns of it in the step's exchange summary and takes the blocks from D's set-aside). At the
end of the step D releases the room it did not use. Frees of D's blocks on C and releases reach C
as a `CreditorUpdate` through rank 0's next plan, before that plan's leases; so D never reuses a
block C has not freed yet, and C's free count in a heartbeat is memory nobody was promised. A
request's new blocks go to its tail segment first, then here, then to creditors with room; each
change of instance starts a new segment, so one instance may hold several segments of a request.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from infinite_llm.kvcache.pool import KVPool
from infinite_llm.request import Request, Segment


@dataclass(frozen=True, slots=True)
class KVStats:
    """Block counts of one instance; `lent` includes blocks set aside under unused leases."""

    total: int
    free: int
    own: int
    lent: int
    borrowed: int


@dataclass(frozen=True, slots=True)
class CreditorUpdate:
    """What an owner tells one creditor after a step: blocks it may free."""

    freed: tuple[str, ...]  # requests whose segments on the creditor are to be freed
    freed_blocks: int  # how many blocks those segments hold
    released: int  # unused lease blocks given back to the creditor's free list

    @property
    def num_blocks(self) -> int:
        return self.freed_blocks + self.released


class RManager:
    def __init__(self, pool: KVPool, instance: int) -> None:
        self.pool = pool
        self.instance = instance
        self._own: dict[str, int] = {}  # request id -> blocks of this pool holding its KV
        self._set_aside: dict[int, list[int]] = defaultdict(list)  # debtor -> unused lease blocks
        self._hosted: dict[tuple[int, str], list[Segment]] = {}  # (owner, request id) -> KV here
        self._room: dict[int, int] = defaultdict(int)  # creditor -> blocks we may still place there
        self._borrowed: dict[int, int] = defaultdict(int)  # creditor -> our blocks there
        self._freed: dict[int, list[str]] = defaultdict(list)  # creditor -> to tell it
        self._freed_blocks: dict[int, int] = defaultdict(int)
        self._released: dict[int, int] = defaultdict(int)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    # ---- the owner's side -------------------------------------------------------------------

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """More blocks the request needs so that its next `num_new_tokens` tokens have slots."""
        held = sum(s.num_blocks for s in request.segments)
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - held)

    def reserve(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request slots for its next `num_new_tokens` tokens, or change nothing and
        return False when neither this pool nor our leases have enough room."""
        needed = self.blocks_needed(request, num_new_tokens)
        if needed == 0:
            return True
        takes = self._placement(request, needed)
        if takes is None:
            return False
        for instance, n in takes:
            tail = request.segments[-1] if request.segments else None
            if tail is None or tail.instance != instance:
                start = sum(s.num_blocks for s in request.segments) * self.block_size
                tail = Segment(instance, start)
                request.segments.append(tail)
            tail.num_blocks += n
            if instance == self.instance:
                tail.blocks.extend(self.pool.allocate(n))
                self._own[request.request_id] = self._own.get(request.request_id, 0) + n
            else:
                self._room[instance] -= n
                self._borrowed[instance] += n
        return True

    def _placement(self, request: Request, needed: int) -> list[tuple[int, int]] | None:
        """Where `needed` new blocks go: the tail's instance, then here, then creditors by most
        room; None if they don't add up."""
        tail = request.segments[-1].instance if request.segments else None
        creditors = sorted((c for c, r in self._room.items() if r > 0),
                           key=lambda c: (-self._room[c], c))
        order = dict.fromkeys([tail, self.instance, *creditors])  # keeps order, drops repeats
        takes = []
        for instance in order:
            if instance is None:
                continue
            room = self.pool.num_free if instance == self.instance else self._room[instance]
            n = min(room, needed)
            if n > 0:
                takes.append((instance, n))
                needed -= n
            if needed == 0:
                return takes
        return None

    def free(self, request: Request) -> None:
        """Free every block of the request, here and (through the next exchange) on creditors."""
        for segment in request.segments:
            if segment.instance == self.instance:
                self.pool.free(segment.blocks)
            else:
                self._borrowed[segment.instance] -= segment.num_blocks
                self._freed_blocks[segment.instance] += segment.num_blocks
                if request.request_id not in self._freed[segment.instance]:
                    self._freed[segment.instance].append(request.request_id)
        self._own.pop(request.request_id, None)
        request.segments.clear()

    def available_blocks(self) -> int:
        """Blocks our requests can take now: free here plus unused lease room elsewhere."""
        return self.pool.num_free + sum(self._room.values())

    def receive_lease(self, creditor: int, num_blocks: int) -> None:
        self._room[creditor] += num_blocks

    def end_step(self) -> dict[int, CreditorUpdate]:
        """Release the lease room not used this step and hand over, by creditor, what each may
        free (each free and release is handed over once)."""
        for creditor, room in self._room.items():
            if room:
                self._released[creditor] += room
        self._room.clear()
        updates = {
            c: CreditorUpdate(tuple(self._freed.get(c, ())), self._freed_blocks.get(c, 0),
                              self._released.get(c, 0))
            for c in sorted(set(self._freed) | set(self._released))
        }
        self._freed.clear()
        self._freed_blocks.clear()
        self._released.clear()
        return updates

    def migrate_out(self, request: Request, target: int) -> list[Segment]:
        """Hand the request's segments held here over to `target` (their KV already sent);
        returns them as they were, for the sender's record."""
        moved = [s for s in request.segments if s.instance == self.instance]
        for segment in moved:
            self.pool.free(segment.blocks)
            self._own[request.request_id] -= segment.num_blocks
            self._borrowed[target] += segment.num_blocks
        if not self._own[request.request_id]:
            del self._own[request.request_id]
        for segment in moved:
            segment.instance, segment.blocks = target, []
        return moved

    # ---- the creditor's side ----------------------------------------------------------------

    def grant_lease(self, debtor: int, num_blocks: int) -> None:
        """Set blocks aside for a debtor; the gManager never asks for more than is free."""
        self._set_aside[debtor].extend(self.pool.allocate(num_blocks))

    def apply_update(self, owner: int, update: CreditorUpdate) -> None:
        """Free what the owner freed and released. Blocks the owner placed here but freed
        before an exchange told us of them are still in its set-aside: they go back too."""
        hosted = 0
        for request_id in update.freed:
            for segment in self._hosted.pop((owner, request_id), []):
                hosted += segment.num_blocks
                self.pool.free(segment.blocks)
        back = update.released + update.freed_blocks - hosted
        self.pool.free([self._set_aside[owner].pop() for _ in range(back)])

    def adopt(self, owner: int, request_id: str, start: int, num_blocks: int) -> list[int]:
        """Take in a migrated segment of another instance's request: new blocks from the free
        list (the gManager migrates only into free memory), to be filled by the caller."""
        segment = Segment(self.instance, start, num_blocks, self.pool.allocate(num_blocks))
        self._hosted.setdefault((owner, request_id), []).append(segment)
        return segment.blocks

    def host(self, owner: int, request_id: str, start: int, num_blocks: int) -> Segment:
        """The segment starting at `start` of another instance's request, kept here and grown to
        `num_blocks` blocks from the owner's set-aside."""
        segments = self._hosted.setdefault((owner, request_id), [])
        segment = next((s for s in segments if s.start == start), None)
        if segment is None:
            segment = Segment(self.instance, start)
            segments.append(segment)
        grow = num_blocks - segment.num_blocks
        if grow > 0:
            aside = self._set_aside[owner]
            if grow > len(aside):
                raise RuntimeError(f"instance {owner} placed KV beyond its lease here")
            segment.blocks.extend(aside[-grow:])
            del aside[-grow:]
            segment.num_blocks = num_blocks
        return segment

    # ---- accounting -------------------------------------------------------------------------

    def own_blocks_by_request(self) -> tuple[tuple[str, int], ...]:
        """(request id, blocks of it held here) for the requests we own, largest first."""
        return tuple(sorted(self._own.items(), key=lambda item: (-item[1], item[0])))

    def lenders(self) -> tuple[int, ...]:
        """Instances hosting KV of our requests, most blocks first (the gManager leases from
        them first, so a long request keeps growing the segments it has)."""
        held = [(-n, c) for c, n in self._borrowed.items() if n > 0]
        return tuple(c for _, c in sorted(held))

    def stats(self) -> KVStats:
        lent = sum(len(b) for b in self._set_aside.values())
        lent += sum(s.num_blocks for segments in self._hosted.values() for s in segments)
        return KVStats(
            total=self.pool.num_blocks,
            free=self.pool.num_free,
            own=sum(self._own.values()),
            lent=lent,
            borrowed=sum(self._borrowed.values()),
        )
