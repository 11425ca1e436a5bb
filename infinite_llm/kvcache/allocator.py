"""What the scheduler asks of a block owner: the protocol `RManager` implements for the engine
and the simulator's ledger implements for a simulated instance, so both run one scheduler.

The scheduler never sees block ids: it asks how many more blocks a request needs, asks for
them (all or nothing), frees a request's blocks when it finishes or is preempted, and asks how
many blocks it could take now when deciding admission.
"""

from __future__ import annotations

from typing import Protocol

from infinite_llm.request import Request


class BlockAllocator(Protocol):
    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """More blocks the request needs so that its next `num_new_tokens` tokens have slots."""
        ...

    def reserve(self, request: Request, num_new_tokens: int) -> bool:
        """Give the request slots for its next `num_new_tokens` tokens, or change nothing and
        return False."""
        ...

    def free(self, request: Request) -> None:
        """Free every block the request holds."""
        ...

    def available_blocks(self) -> int:
        """Blocks the instance's requests can take now."""
        ...
