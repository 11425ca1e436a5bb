"""What a request produces: per-step deltas from its owner, cumulative outputs for the user.

A `RequestDelta` is the one shape of a result in flight: made by the owner instance, reported to
the engine, handed to the Python API and (through the async engine) to the server, which writes
each as an SSE chunk. Whoever wants the whole answer folds the deltas into a `RequestOutput` with
`RequestOutput.apply`, the one place where deltas are accumulated (`LLMEngine.step` for
`LLM.generate`; a server's `RequestStream` for its non-streaming responses and usage).

Text is made on the owner by incremental detokenization, which also finds stop strings; text that
could still turn into a stop string is held back, so a stream never shows part of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infinite_llm.request import FinishReason

Logprobs = dict[int, float]  # token id -> logprob, the top-n and the sampled token


@dataclass(frozen=True, slots=True)
class RequestDelta:
    """What one step added to one request (sent from its owner instance to the frontend);
    `finish_reason` is set on its last delta only. Immutable, so it may cross threads."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[Logprobs, ...] = ()
    finish_reason: FinishReason | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[Logprobs] | None = None


@dataclass(slots=True)
class RequestOutput:
    """Shaped like vLLM's: `outputs[0]` holds the generated tokens and text so far."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False

    @classmethod
    def empty(cls, request_id: str, prompt: str | None, prompt_token_ids: list[int],
              logprobs: bool) -> RequestOutput:
        """Before its first delta: no tokens, and `logprobs` a list only when asked for."""
        return cls(request_id, prompt, prompt_token_ids,
                   [CompletionOutput(0, "", [], None, [] if logprobs else None)])

    def apply(self, delta: RequestDelta) -> None:
        """Fold one delta in (the only place deltas are accumulated)."""
        out = self.outputs[0]
        out.token_ids.extend(delta.token_ids)
        out.text += delta.text
        if out.logprobs is not None:
            out.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason.value
            self.finished = True


@dataclass(slots=True)
class Detokenizer:
    """Incremental detokenization of one request's output, with stop strings.

    Decoding a sliding window of tokens (`prefix_offset .. end`) and keeping only what the window's
    last token added costs O(1) per token and keeps multi-byte characters and word-boundary spaces
    right; a window that ends in an incomplete character (U+FFFD) waits for the next token.
    """

    tokenizer: Any
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    emitted: int = 0

    def add(self, token_id: int) -> bool:
        """Add one token; returns True when the text now ends at a stop string."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.prefix_offset, self.read_offset)
        window = self._decode(self.prefix_offset, len(self.token_ids))
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return False
        added = window[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += added
        return self._truncate_at_stop(len(added))

    def take(self, finished: bool) -> str:
        """Text not yet handed out; while unfinished, keep back what may begin a stop string."""
        hold = 0 if finished or not self.stop else max(len(s) for s in self.stop) - 1
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out

    def _decode(self, lo: int, hi: int) -> str:
        return self.tokenizer.decode(
            self.token_ids[lo:hi], skip_special_tokens=self.skip_special_tokens
        )

    def _truncate_at_stop(self, num_new_chars: int) -> bool:
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, len(self.text) - num_new_chars - longest + 1)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[: index + len(stop) if self.include_stop else index]
        return True
