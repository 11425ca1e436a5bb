"""AsyncLLMEngine in-process over a tiny model: streams carry exactly what the engine makes,
a closed stream aborts its request, the waiting limit holds, and a failing engine fails its
streams instead of leaving them hanging."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from infinite_llm import SamplingParams
from infinite_llm.config import EngineConfig
from infinite_llm.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from infinite_llm.engine.engine import LLMEngine, RequestError
from infinite_llm.entrypoints.prompts import tokenize

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
LONG = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Callable[[str], Path]) -> LLMEngine:
    """One request runs at a time, so a second one is reliably left waiting."""
    return LLMEngine(EngineConfig.from_options(model=str(tiny_checkpoint("llama")),
                                               num_kv_blocks=64, max_num_seqs=1))


def _ids(engine: LLMEngine, prompt: str) -> list[int]:
    """Tokenized before the engine thread starts: it uses the engine's tokenizer, which must
    not be shared across threads."""
    return tokenize(engine.tokenizer, prompt)


def _offline(engine: LLMEngine, prompt: str, params: SamplingParams) -> tuple[str, list[int]]:
    request_id = engine.add_request(_ids(engine, prompt), params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == request_id:
                return out.outputs[0].text, out.outputs[0].token_ids
    raise AssertionError("the request never finished")


def _sample(async_engine: AsyncLLMEngine, name: str) -> float | None:
    return async_engine.metrics.registry.get_sample_value(name, {"instance": "0"})


async def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_streams_carry_exactly_what_the_engine_generates(engine: LLMEngine) -> None:
    prompts = ["Hello there", "The capital of France is", "1, 2, 3,"]
    expected = [_offline(engine, p, GREEDY) for p in prompts]
    prompt_ids = [_ids(engine, p) for p in prompts]

    async def main() -> list[tuple[str, list[int], int, str | None]]:
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()

        async def one(i: int, ids: list[int]) -> tuple[str, list[int], int, str | None]:
            stream = await async_engine.add_request(f"r{i}", ids, GREEDY)
            text, tokens, logprobs, finish = "", [], 0, None
            async for delta in stream:
                text += delta.text
                tokens += delta.token_ids
                logprobs += len(delta.logprobs)
                finish = delta.finish_reason
            assert logprobs == len(tokens)
            whole = stream.output  # the deltas, folded as they were read
            assert (whole.outputs[0].text, whole.outputs[0].token_ids) == (text, tokens)
            assert whole.finished and whole.outputs[0].finish_reason == finish
            return text, tokens, len(whole.prompt_token_ids), finish

        try:
            return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids)))
        finally:
            async_engine.shutdown()

    results = asyncio.run(main())
    assert [(text, tokens) for text, tokens, _, _ in results] == expected
    assert [n for _, _, n, _ in results] == [len(_ids(engine, p)) for p in prompts]
    assert {finish for *_, finish in results} == {"length"}


def test_closed_stream_aborts_its_request_and_the_waiting_limit_holds(engine: LLMEngine) -> None:
    once, hi = _ids(engine, "Once upon a time"), _ids(engine, "Hi")

    async def main() -> None:
        async_engine = AsyncLLMEngine(engine, max_waiting=1)
        async_engine.start()
        try:
            total = _sample(async_engine, "infinite_llm_kv_blocks_total")
            running = await async_engine.add_request("a", once, LONG)
            first = await anext(aiter(running))
            assert first.token_ids and first.finish_reason is None
            with pytest.raises(RequestError):  # bad input is refused, not counted as waiting
                await async_engine.add_request("d", [], GREEDY)
            assert async_engine.num_unstarted == 0
            waiting = await async_engine.add_request("b", once, LONG)
            assert async_engine.num_unstarted == 1
            with pytest.raises(QueueFullError):
                await async_engine.add_request("c", hi, GREEDY)
            running.close()
            waiting.close()
            await _until(lambda: async_engine.metrics.registry.get_sample_value(
                "infinite_llm_request_finished_total", {"finish_reason": "abort"}) == 2)
            await _until(lambda: _sample(async_engine, "infinite_llm_kv_blocks_free") == total)
            assert async_engine.num_unstarted == 0
            assert not engine.has_unfinished_requests()
        finally:
            async_engine.shutdown()

    asyncio.run(main())


def test_a_failing_engine_fails_its_streams(engine: LLMEngine, monkeypatch) -> None:
    def broken_step() -> list:
        raise RuntimeError("boom")

    hello = _ids(engine, "Hello")

    async def main() -> None:
        async_engine = AsyncLLMEngine(engine)
        monkeypatch.setattr(engine, "step_deltas", broken_step)
        async_engine.start()
        stream = await async_engine.add_request("x", hello, GREEDY)
        with pytest.raises(EngineDeadError, match="boom"):
            async for _ in stream:
                pass
        await _until(lambda: not async_engine.is_alive)
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("y", hello, GREEDY)
        async_engine.shutdown()

    asyncio.run(main())
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()  # its request was aborted, its blocks freed
    assert all(s.free == s.total for s in engine.kv_stats())
