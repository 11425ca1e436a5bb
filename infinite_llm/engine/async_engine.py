"""AsyncLLMEngine: one thread steps the engine, each request reads its own asyncio stream.

The engine is synchronous and not thread-safe, and a step is torch compute that may take tens of
milliseconds. So exactly one thread (the engine thread) calls the `LLMEngine`; the event loop
never does. The loop sends it commands (add, abort) through a queue and gets back, once per
step, the step's `RequestDelta` of every request that changed, delivered with
`call_soon_threadsafe`. The event loop stays free to accept connections and write SSE while
torch computes (torch releases the GIL inside its ops).

Invariants:
- every accepted request ends with exactly one delta whose `finish_reason` is set, or with an
  exception (the engine failed), unless its consumer closed the stream first;
- a stream closed before its end aborts its request, so its KV blocks are freed at once;
- only deltas cross to the event loop, and they are immutable: the engine's cumulative
  `RequestOutput`s, which the engine thread keeps mutating, stay on the engine thread; each
  stream folds its deltas into its own `output` as they are read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from infinite_llm.engine.engine import LLMEngine
from infinite_llm.engine.metrics import EngineMetrics
from infinite_llm.outputs import RequestDelta, RequestOutput
from infinite_llm.request import FinishReason
from infinite_llm.sampling import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting for their first token; retry later (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine thread failed and stopped; no request can be served (HTTP 503)."""


class RequestStream:
    """The consumer's side of one request: `async for delta in stream`, then `close()`.
    `output` is the answer so far: every delta read is folded into it."""

    def __init__(self, output: RequestOutput, engine: AsyncLLMEngine) -> None:
        self.request_id = output.request_id
        self.output = output
        self.started = False  # has produced a token (or ended)
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()

    def __aiter__(self) -> AsyncIterator[RequestDelta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestDelta]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.output.apply(item)
            self.finished = self.output.finished
            yield item

    def close(self) -> None:
        """Abort the request unless it has ended; safe to call more than once and from a
        `finally` during cancellation (it only queues a command)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


@dataclass(slots=True)
class _Tracked:
    """Engine-thread bookkeeping for one accepted request."""

    stream: RequestStream
    arrival: float
    num_prompt_tokens: int
    first_token: float | None = None
    num_tokens: int = 0


@dataclass(frozen=True, slots=True)
class _Add:
    stream: RequestStream
    prompt_token_ids: tuple[int, ...]
    prompt: str | None
    params: SamplingParams
    arrival: float
    accepted: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class AsyncLLMEngine:
    """Serve an `LLMEngine` to asyncio code; `start()` inside the running event loop."""

    def __init__(
        self,
        engine: LLMEngine,
        metrics: EngineMetrics | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics or EngineMetrics()
        self.max_waiting = max_waiting
        self.max_model_len: int = engine.max_model_len
        self.model_config = engine.model_config
        self.error: BaseException | None = None  # why the engine thread died, if it did
        self._commands: deque[_Add | _Abort] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._closed = False  # set by the engine thread as it stops; guarded by _cond
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._num_unstarted = 0  # event loop only: accepted (or being added), no token yet

    # ---- event loop side -----------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._observe()  # before the thread exists: /metrics shows the pool from the start
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort every request and stop the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_unstarted(self) -> int:
        return self._num_unstarted

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> RequestStream:
        """Queue a request for its prompt's token ids (`prompt`: the text they were made from,
        if any); returns its stream once the engine accepted it. Raises what
        `LLMEngine.add_request` raises (`RequestError`, `SamplingParamsError`), `QueueFullError`
        when `max_waiting` requests already wait, `EngineDeadError` when the engine is gone."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running ({self.error or 'stopped'})")
        if self.max_waiting is not None and self._num_unstarted >= self.max_waiting:
            raise QueueFullError(
                f"{self._num_unstarted} requests are waiting (the limit is {self.max_waiting})"
            )
        output = RequestOutput.empty(request_id, prompt, list(prompt_token_ids),
                                     params.logprobs is not None)
        stream = RequestStream(output, self)
        command = _Add(stream, tuple(prompt_token_ids), prompt, params, time.monotonic())
        self._num_unstarted += 1
        self._send(command)
        try:
            await asyncio.wrap_future(command.accepted)
        except BaseException as e:
            stream.started = True  # counted out here, so its deliveries must not count it again
            self._num_unstarted -= 1
            if isinstance(e, asyncio.CancelledError):  # the client left while we waited
                self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; unknown or finished ids are ignored."""
        self._send(_Abort(request_id))

    def _send(self, command: _Add | _Abort) -> None:
        with self._cond:
            if self._closed:  # the engine thread has stopped: nobody would ever answer
                if isinstance(command, _Add):
                    command.accepted.set_exception(EngineDeadError("the engine has stopped"))
                return
            self._commands.append(command)
            self._cond.notify()

    def _deliver(
        self, items: Sequence[tuple[RequestStream, RequestDelta | BaseException]]
    ) -> None:
        """Runs on the event loop: hand each delta to its stream."""
        for stream, item in items:
            if not stream.started and (isinstance(item, BaseException) or item.token_ids
                                       or item.finish_reason is not None):
                stream.started = True
                self._num_unstarted -= 1
            stream._queue.put_nowait(item)

    # ---- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (commands := self._next_commands()) is not None:
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step_deltas())
                self._observe()
        except BaseException as e:  # a bug in a step: fail every request, stop serving
            logger.exception("the engine thread failed; no more requests will be served")
            self.error = e
            self._post([(t.stream, EngineDeadError(f"the engine failed: {e!r}"))
                        for t in self._tracked.values()])
            for request_id in self._tracked:  # best effort: give their blocks back
                with contextlib.suppress(Exception):
                    self.engine.abort_request(request_id)
            self._tracked.clear()
            self._fail_pending(e)
            with contextlib.suppress(Exception):
                self._observe()
            return
        self._stop()

    def _next_commands(self) -> list[_Add | _Abort] | None:
        """Wait until there is a command or work; None when the engine should stop."""
        with self._cond:
            while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                self._cond.wait()
            if self._stopping:
                return None
            commands = list(self._commands)
            self._commands.clear()
            return commands

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            tracked = self._tracked.pop(command.request_id, None)
            if tracked is not None:
                self.engine.abort_request(command.request_id)
                self._end(tracked, FinishReason.ABORT)
            return
        request_id = command.stream.request_id
        try:
            self.engine.add_request(command.prompt_token_ids, command.params, request_id,
                                    command.prompt)
        except Exception as e:  # bad input: the caller answers 400
            command.accepted.set_exception(e)
            return
        self._tracked[request_id] = _Tracked(command.stream, command.arrival,
                                             len(command.prompt_token_ids))
        command.accepted.set_result(None)

    def _publish(self, deltas: list[RequestDelta]) -> None:
        now = time.monotonic()
        items: list[tuple[RequestStream, RequestDelta | BaseException]] = []
        new_tokens = 0
        for delta in deltas:
            tracked = self._tracked.get(delta.request_id)
            if tracked is None:  # aborted in this iteration; nobody listens
                continue
            tracked.num_tokens += len(delta.token_ids)
            new_tokens += len(delta.token_ids)
            if tracked.first_token is None and delta.token_ids:
                tracked.first_token = now
                self.metrics.observe_first_token(now - tracked.arrival, tracked.num_prompt_tokens)
            items.append((tracked.stream, delta))
            if delta.finish_reason is not None:
                del self._tracked[delta.request_id]
                self._end(tracked, delta.finish_reason, now)
        self.metrics.observe_tokens(new_tokens)
        self._post(items)

    def _end(self, tracked: _Tracked, finish_reason: FinishReason,
             now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        ttft = None if tracked.first_token is None else tracked.first_token - tracked.arrival
        self.metrics.observe_finished(finish_reason.value, now - tracked.arrival, ttft,
                                      tracked.num_tokens)
        if finish_reason is FinishReason.ABORT:  # the consumer has gone; end its stream anyway
            delta = RequestDelta(tracked.stream.request_id, (), "", (), FinishReason.ABORT)
            self._post([(tracked.stream, delta)])

    def _observe(self) -> None:
        waiting = sum(1 for t in self._tracked.values() if t.first_token is None)
        self.metrics.observe_engine(self.engine.kv_stats(), self.engine.num_preemptions,
                                    len(self._tracked) - waiting, waiting)

    def _post(self, items: list[tuple[RequestStream, Any]]) -> None:
        if not items or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is left to read
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _stop(self) -> None:
        """Shutdown: abort what is in flight, refuse what is still queued."""
        for request_id in list(self._tracked):
            self.engine.abort_request(request_id)
            self._end(self._tracked.pop(request_id), FinishReason.ABORT)
        self._fail_pending(EngineDeadError("the server is shutting down"))
        self._observe()
        self.engine.shutdown()  # a multi-instance engine stops its workers

    def _fail_pending(self, error: BaseException) -> None:
        """Refuse what is queued, and (`_closed`) whatever is sent from now on."""
        with self._cond:
            self._closed = True
            pending, self._commands = list(self._commands), deque()
        for command in pending:
            if isinstance(command, _Add) and not command.accepted.done():
                command.accepted.set_exception(
                    error if isinstance(error, EngineDeadError) else EngineDeadError(repr(error))
                )
