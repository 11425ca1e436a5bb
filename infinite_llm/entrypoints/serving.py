"""Completions and chat completions over the async engine, in OpenAI's response shapes.

One flow for both endpoints (validate and tokenize -> add -> stream or collect); what differs is
the shape of a chunk, of the final body and of logprobs, which `CompletionFormat` and
`ChatFormat` hold. Each prompt is tokenized here, once (text with `tokenize`, messages with
`apply_chat_template`), and its token ids go down to the engine. A chunk is made from one
`RequestDelta`, a whole answer from the `RequestOutput` its stream folded the deltas into.
A completion may carry several prompts: each is one engine request (added together, so they
batch) and one choice, `index` i for prompt i; usage is their sum. Streams are SSE
(`data: {json}` ... `data: [DONE]`), one chunk per engine step and prompt that produced a token
(its text may be empty while the detokenizer holds back a possible stop string), so a client
sees every token's timing. Whoever leaves first, the client or the request, all of the HTTP
request's engine requests are closed in a `finally`: a client gone mid-stream, or one prompt
refused, aborts them all and frees their blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from infinite_llm.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    QueueFullError,
    RequestStream,
)
from infinite_llm.engine.engine import RequestError
from infinite_llm.entrypoints.prompts import apply_chat_template, tokenize
from infinite_llm.entrypoints.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
)
from infinite_llm.outputs import Logprobs, RequestDelta, RequestOutput
from infinite_llm.sampling import SamplingParams, SamplingParamsError

T = TypeVar("T")
RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt of a request, tokenized: its text (None when sent as token ids or messages)
    and its token ids."""

    text: str | None
    token_ids: list[int]


def usage(outs: list[RequestOutput]) -> dict[str, int]:
    """OpenAI's usage of one HTTP request: the sum over its prompts."""
    num_prompt = sum(len(out.prompt_token_ids) for out in outs)
    num_output = sum(len(out.outputs[0].token_ids) for out in outs)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output,
            "total_tokens": num_prompt + num_output}


def _finish_reason(delta: RequestDelta) -> str | None:
    return None if delta.finish_reason is None else delta.finish_reason.value


class _Format:
    """Response shapes of one endpoint; `logprobs=None` when the request did not ask."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""
    prompt_param = ""  # the body field a RequestError (empty, too long...) is about

    def __init__(self, tokenizer: Any, model: str, logprobs: int | None) -> None:
        self.tokenizer, self.model, self.num_logprobs = tokenizer, model, logprobs
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def envelope(self, chunk: bool) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object_name if chunk else self.object_name,
                "created": self.created, "model": self.model}

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, index: int, delta: RequestDelta) -> dict[str, Any]:
        raise NotImplementedError

    def final(self, outs: list[RequestOutput]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(_Format):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"
    prompt_param = "prompt"

    def __init__(self, tokenizer: Any, model: str, logprobs: int | None) -> None:
        super().__init__(tokenizer, model, logprobs)
        self.text_offsets: dict[int, int] = {}  # per choice: where its next token starts

    def _logprobs(self, index: int, token_ids: tuple[int, ...] | list[int],
                  logprobs: tuple[Logprobs, ...] | list[Logprobs]) -> dict[str, Any] | None:
        """The legacy shape: parallel lists; top_logprobs holds the top-n and the sampled
        token (so up to n + 1 entries), as OpenAI documents."""
        if self.num_logprobs is None:
            return None
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for text in tokens:
            offsets.append(self.text_offsets.get(index, 0))
            self.text_offsets[index] = offsets[-1] + len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp[t] for t, lp in zip(token_ids, logprobs)],
            "top_logprobs": [{self.token_text(k): v for k, v in lp.items()} for lp in logprobs],
            "text_offset": offsets,
        }

    def chunk(self, index: int, delta: RequestDelta) -> dict[str, Any]:
        choice = {"index": index, "text": delta.text,
                  "logprobs": self._logprobs(index, delta.token_ids, delta.logprobs),
                  "finish_reason": _finish_reason(delta)}
        return {**self.envelope(True), "choices": [choice]}

    def final(self, outs: list[RequestOutput]) -> dict[str, Any]:
        choices = [{"index": i, "text": out.outputs[0].text,
                    "logprobs": self._logprobs(i, out.outputs[0].token_ids,
                                               out.outputs[0].logprobs or []),
                    "finish_reason": out.outputs[0].finish_reason}
                   for i, out in enumerate(outs)]
        return {**self.envelope(False), "choices": choices, "usage": usage(outs)}


class ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"
    prompt_param = "messages"

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, token_ids: tuple[int, ...] | list[int],
                  logprobs: tuple[Logprobs, ...] | list[Logprobs]) -> dict[str, Any] | None:
        if self.num_logprobs is None:
            return None
        content = []
        for token_id, lp in zip(token_ids, logprobs):
            top = sorted(lp.items(), key=lambda kv: -kv[1])[: self.num_logprobs]
            content.append({**self._entry(token_id, lp[token_id]),
                            "top_logprobs": [self._entry(t, v) for t, v in top]})
        return {"content": content}

    def opening_chunks(self) -> list[dict[str, Any]]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return [{**self.envelope(True), "choices": [choice]}]

    def chunk(self, index: int, delta: RequestDelta) -> dict[str, Any]:
        choice = {"index": index, "delta": {"content": delta.text} if delta.text else {},
                  "logprobs": self._logprobs(delta.token_ids, delta.logprobs),
                  "finish_reason": _finish_reason(delta)}
        return {**self.envelope(True), "choices": [choice]}

    def final(self, outs: list[RequestOutput]) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": out.outputs[0].text},
                    "logprobs": self._logprobs(out.outputs[0].token_ids,
                                               out.outputs[0].logprobs or []),
                    "finish_reason": out.outputs[0].finish_reason}
                   for i, out in enumerate(outs)]
        return {**self.envelope(False), "choices": choices, "usage": usage(outs)}


class OpenAIServing:
    """The two generation endpoints. `tokenizer` is the event loop's own copy (the engine
    thread uses the engine's; a Rust tokenizer must not be shared across threads)."""

    def __init__(self, engine: AsyncLLMEngine, tokenizer: Any, model_name: str) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name

    async def completion(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = _sampling_params(body.sampling_params)
        prompts = [self._check_room(body, self._prompt(prompt)) for prompt in body.prompts()]
        fmt = CompletionFormat(self.tokenizer, self.model_name, params.logprobs)
        return await self._generate(fmt, prompts, params, body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = _sampling_params(body.sampling_params)
        prompt = self._check_room(body, Prompt(None, self._chat_prompt(body)))
        fmt = ChatFormat(self.tokenizer, self.model_name, params.logprobs)
        return await self._generate(fmt, [prompt], params, body, request)

    def _check_model(self, model: str | None) -> None:
        """404, as OpenAI and vLLM answer: the official client raises NotFoundError for it."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}", "model", "model_not_found")

    def _prompt(self, prompt: str | list[int]) -> Prompt:
        """A completion's prompt and its token ids (the engine checks their range)."""
        text = prompt if isinstance(prompt, str) else None
        try:
            return Prompt(text, tokenize(self.tokenizer, prompt))
        except RequestError as e:  # no tokenizer, or not valid Unicode
            raise bad_request(str(e), "prompt") from e

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions")
        try:
            return apply_chat_template(self.tokenizer, [m.for_template() for m in body.messages])
        except RequestError as e:
            raise bad_request(str(e), "messages") from e

    def _check_room(self, body: CompletionRequest | ChatCompletionRequest,
                    prompt: Prompt) -> Prompt:
        """vLLM's 400 for a max_tokens the context can't hold with the prompt (the engine
        would cut it short); returns the prompt."""
        max_tokens = body.requested_max_tokens
        max_len, num_prompt = self.engine.max_model_len, len(prompt.token_ids)
        if max_tokens is not None and num_prompt + max_tokens > max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages "
                "or completion.", body.max_tokens_param)
        return prompt

    async def _generate(
        self,
        fmt: _Format,
        prompts: list[Prompt],
        params: SamplingParams,
        body: CompletionRequest | ChatCompletionRequest,
        request: Request,
    ) -> Response:
        streams = await self._add_all(fmt, prompts, params)
        if body.stream:  # `background` closes streams whose generator never started
            return StreamingResponse(self._sse(fmt, streams, body.include_usage),
                                     media_type="text/event-stream",
                                     background=BackgroundTask(_close, streams))
        try:
            gathered = await _unless_disconnected(request, _drain(streams))
        except EngineDeadError as e:
            raise APIError(503, str(e), code="engine_dead") from e
        finally:
            _close(streams)
        if not gathered:
            return Response(status_code=499)  # nobody is there to read it
        return JSONResponse(fmt.final([stream.output for stream in streams]))

    async def _add_all(self, fmt: _Format, prompts: list[Prompt],
                       params: SamplingParams) -> list[RequestStream]:
        """Add every prompt at once, so they batch; if any is refused (or we are cancelled),
        the others are aborted and the first refusal, in prompt order, is raised. More prompts
        than `max_waiting` lets wait could never all be taken: a 400, not a 503 to retry."""
        limit = self.engine.max_waiting
        if limit is not None and len(prompts) > limit:
            raise bad_request(f"the request has {len(prompts)} prompts, but this server lets at "
                              f"most {limit} requests wait (--max-waiting)", fmt.prompt_param)
        adds = [asyncio.ensure_future(self._add(fmt, f"{fmt.id}-{i}", prompt, params))
                for i, prompt in enumerate(prompts)]
        try:
            await asyncio.wait(adds)
        except BaseException:
            _abort_adds(adds)
            raise
        errors = [e for e in (add.exception() for add in adds) if e is not None]
        if errors:
            _abort_adds(adds)
            raise errors[0]
        return [add.result() for add in adds]

    async def _add(self, fmt: _Format, request_id: str, prompt: Prompt,
                   params: SamplingParams) -> RequestStream:
        try:
            return await self.engine.add_request(request_id, prompt.token_ids, params,
                                                 prompt.text)
        except (RequestError, SamplingParamsError) as e:
            param = fmt.prompt_param if isinstance(e, RequestError) else None
            raise bad_request(str(e), param) from e
        except QueueFullError as e:
            raise APIError(503, f"the server is busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from e
        except EngineDeadError as e:
            raise APIError(503, str(e), code="engine_dead") from e

    async def _sse(self, fmt: _Format, streams: list[RequestStream],
                   include_usage: bool) -> AsyncIterator[str]:
        try:
            for chunk in fmt.opening_chunks():
                yield _event(chunk, include_usage)
            async for i, delta in _merged(streams):
                if delta.token_ids or delta.text or delta.finish_reason is not None:
                    yield _event(fmt.chunk(i, delta), include_usage)
            if include_usage:
                yield _event({**fmt.envelope(True), "choices": [],
                              "usage": usage([stream.output for stream in streams])}, False)
        except EngineDeadError as e:
            yield _event(APIError(503, str(e), code="engine_dead").body(), False)
        finally:
            _close(streams)  # a client gone mid-stream lands here (cancelled): abort
        yield "data: [DONE]\n\n"


def _sampling_params(make: Any) -> SamplingParams:
    try:
        return make()
    except SamplingParamsError as e:  # its messages start with the parameter's name
        message = str(e)
        raise bad_request(message, message.split(" ", 1)[0]) from e


def _event(chunk: dict[str, Any], include_usage: bool) -> str:
    if include_usage:  # OpenAI sends `usage: null` on every chunk but the last when asked
        chunk = {**chunk, "usage": None}
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def _close(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


def _abort_adds(adds: list[asyncio.Future[RequestStream]]) -> None:
    """Close the streams of the accepted adds; cancel those still waiting (a cancelled add
    aborts its own request)."""
    for add in adds:
        if not add.done():
            add.cancel()
        elif not add.cancelled() and add.exception() is None:
            add.result().close()


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestDelta]]:
    """(prompt index, delta) from all of one HTTP request's streams, as each arrives."""
    if len(streams) == 1:  # the common case needs no task per delta
        async for delta in streams[0]:
            yield 0, delta
        return
    iterators = [aiter(stream) for stream in streams]
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending.pop(task)
                try:
                    delta = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[i]))] = i
                yield i, delta
    finally:
        for task in pending:
            task.cancel()


async def _drain(streams: list[RequestStream]) -> None:
    """Read the streams to their ends; each folds its deltas into its `output`."""
    async for _ in _merged(streams):
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> bool:
    """Run `work` unless the client disconnects first; True when it ran to its end.

    A non-streaming client that gives up would otherwise keep its request generating (and its
    blocks held) until it finished; Starlette only watches disconnects while streaming.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        task.result()  # re-raise what the work raised
        return True
    return False


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
