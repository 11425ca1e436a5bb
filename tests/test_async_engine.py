"""AsyncLLMEngine in-process over a tiny model: streams carry exactly what the engine makes,
a closed stream aborts its request, the waiting limit holds, and a failing engine fails its
streams instead of leaving them hanging."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from infinite_llm import SamplingParams
from infinite_llm.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from infinite_llm.engine.engine import LLMEngine, RequestError, engine_config

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
LONG = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Callable[[str], Path]) -> LLMEngine:
    """One request runs at a time, so a second one is reliably left waiting."""
    options = {"num_kv_blocks": 64, "max_num_seqs": 1}
    return LLMEngine(engine_config(str(tiny_checkpoint("llama")), options))


def _offline(engine: LLMEngine, prompt: str, params: SamplingParams) -> tuple[str, list[int]]:
    request_id = engine.add_request(prompt, params)
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

    async def main() -> list[tuple[str, list[int], int, str | None]]:
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()

        async def one(i: int, prompt: str) -> tuple[str, list[int], int, str | None]:
            stream = await async_engine.add_request(f"r{i}", prompt, GREEDY)
            text, tokens, logprobs, finish = "", [], 0, None
            async for delta in stream:
                text += delta.text
                tokens += delta.token_ids
                logprobs += len(delta.logprobs)
                finish = delta.finish_reason
            assert logprobs == len(tokens)
            return text, tokens, delta.num_prompt_tokens, finish

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            async_engine.shutdown()

    results = asyncio.run(main())
    assert [(text, tokens) for text, tokens, _, _ in results] == expected
    assert [n for _, _, n, _ in results] == [len(engine.tokenize(p)) for p in prompts]
    assert {finish for *_, finish in results} == {"length"}


def test_closed_stream_aborts_its_request_and_the_waiting_limit_holds(engine: LLMEngine) -> None:
    async def main() -> None:
        async_engine = AsyncLLMEngine(engine, max_waiting=1)
        async_engine.start()
        try:
            total = _sample(async_engine, "infinite_llm_kv_blocks_total")
            running = await async_engine.add_request("a", "Once upon a time", LONG)
            first = await anext(aiter(running))
            assert first.token_ids and first.finish_reason is None
            with pytest.raises(RequestError):  # bad input is refused, not counted as waiting
                await async_engine.add_request("d", "", GREEDY)
            assert async_engine.num_unstarted == 0
            waiting = await async_engine.add_request("b", "Once upon a time", LONG)
            assert async_engine.num_unstarted == 1
            with pytest.raises(QueueFullError):
                await async_engine.add_request("c", "Hi", GREEDY)
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

    async def main() -> None:
        async_engine = AsyncLLMEngine(engine)
        monkeypatch.setattr(engine, "step", broken_step)
        async_engine.start()
        stream = await async_engine.add_request("x", "Hello", GREEDY)
        with pytest.raises(EngineDeadError, match="boom"):
            async for _ in stream:
                pass
        await _until(lambda: not async_engine.is_alive)
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("y", "Hello", GREEDY)
        async_engine.shutdown()

    asyncio.run(main())
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()  # its request was aborted, its blocks freed
    assert all(s.free == s.total for s in engine.kv_stats())
