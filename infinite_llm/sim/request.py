"""A simulated request: the trace's numbers, what happened to it, and (in the asynchronous
simulator) its token counters and where its KV blocks are.

Same counting as the engine's Request: `num_computed` tokens have KV; the request wants
`prompt_len + num_output - num_computed` more, and once it has none left a step samples one
output token. A preempted request drops its KV and recomputes prompt and output so far. The
lockstep simulator schedules an engine `Request` in its place (`lockstep.LockstepInstance`) and
notes here only the placement, the first token, the finish and the counts at the finish: its
`status` stays WAITING from placement to finish, and its counters and blocks stay zero.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.Enum):
    ARRIVING = "arriving"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"


@dataclass(slots=True, eq=False)
class SimRequest:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    status: Status = Status.ARRIVING
    owner: int | None = None
    num_computed: int = 0
    num_output: int = 0
    blocks: dict[int, int] = field(default_factory=dict)  # instance -> blocks of our KV there
    num_blocks: int = 0  # sum(blocks.values()), kept in step for speed
    first_token_s: float | None = None
    finish_s: float | None = None
    num_preemptions: int = 0

    @property
    def num_uncomputed(self) -> int:
        return self.prompt_len + self.num_output - self.num_computed

    @property
    def max_kv_tokens(self) -> int:
        """KV slots it holds at its longest: prompt and all outputs but the last."""
        return self.prompt_len + self.output_len - 1
