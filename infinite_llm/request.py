"""A request as its owner instance sees it (tokens, progress, sampling state, KV segments), and
the batch of requests one step computes.

The request owns its counters. `num_computed_tokens` says how many of `token_ids` have their K/V in
the cache; a step computes the next chunk of them, and once all are computed the step samples one
more token. Prefill and decode are the same thing seen at different counts. The KV cache is a list
of segments, each a run of blocks on one instance holding consecutive positions.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from infinite_llm.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """As OpenAI spells them: `stop` (EOS, stop token or stop string), `length`, `abort`."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(slots=True)
class Segment:
    """Consecutive KV positions `start .. start + num_blocks * block_size - 1` on one instance.

    `blocks` lists the block ids when the segment lives in this process's pool; the owner of a
    request keeps only the count for a segment on a creditor (the ids are the creditor's).
    """

    instance: int
    start: int
    num_blocks: int = 0
    blocks: list[int] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never past the engine's max_model_len
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)  # prompt, then output
    num_computed_tokens: int = 0
    segments: list[Segment] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_stalled_steps: int = 0  # steps in a row it waited for a lease
    arrival_time: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and finish on EOS, a stop token or max_tokens (not stop strings:
        those need text, which the detokenizer checks)."""
        self.token_ids.append(token_id)
        if token_id in self.params.stop_token_ids or (
            not self.params.ignore_eos and token_id in self.eos_token_ids
        ):
            self.finish(FinishReason.STOP)
        elif self.num_output_tokens >= self.max_tokens:
            self.finish(FinishReason.LENGTH)

    def finish(self, reason: FinishReason) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason

    def reset_for_recompute(self) -> None:
        """After preemption: the KV is gone and every token will be computed again."""
        self.num_computed_tokens = 0
        self.num_stalled_steps = 0
        self.num_preemptions += 1
        self.status = RequestStatus.WAITING


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    """One step's work: request i computes its tokens `starts[i] .. starts[i] + num_tokens[i] - 1`
    and, when that reaches its last token (`samples[i]`), samples the next one. A value: the
    counters it was built from may move on (the instance advances them after the forward), the
    batch keeps what the step was."""

    requests: tuple[Request, ...] = ()
    starts: tuple[int, ...] = ()
    num_tokens: tuple[int, ...] = ()
    samples: tuple[bool, ...] = ()

    @classmethod
    def of(cls, requests: Iterable[Request], num_tokens: Iterable[int]) -> ScheduledBatch:
        """The batch in which each request computes its next `num_tokens` tokens from where it
        stands now."""
        requests, num_tokens = tuple(requests), tuple(num_tokens)
        return cls(requests, tuple(r.num_computed_tokens for r in requests), num_tokens,
                   tuple(r.num_computed_tokens + n == r.num_tokens
                         for r, n in zip(requests, num_tokens)))

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def sampling(self) -> tuple[Request, ...]:
        """The requests that sample this step, in batch order."""
        return tuple(r for r, s in zip(self.requests, self.samples) if s)

    def is_decode_of(self, other: ScheduledBatch) -> bool:
        """Whether this batch is exactly `other`'s requests (in any order) each computing one
        token at the position `other` computes it: the check that a step queued ahead is the
        step the scheduler chose."""
        if (len(self.requests) != len(other.requests) or any(n != 1 for n in self.num_tokens)
                or not all(self.samples)):
            return False
        at = {id(r): s for r, s in zip(other.requests, other.starts)}
        return all(at.get(id(r)) == s for r, s in zip(self.requests, self.starts))
