"""The offline Python API, shaped like vLLM's `LLM` so its users feel at home.

    from infinite_llm import LLM, SamplingParams
    llm = LLM()                                   # the default model
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from infinite_llm.config import EngineConfig
from infinite_llm.engine.engine import LLMEngine, RequestError
from infinite_llm.entrypoints.prompts import Message, apply_chat_template, tokenize
from infinite_llm.kvcache.rmanager import KVStats
from infinite_llm.outputs import RequestOutput
from infinite_llm.sampling import SamplingParams, SamplingParamsError

Prompt = str | Sequence[int]


class LLM:
    """An engine over the given model (None = the default model); options as in EngineConfig."""

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_options(model=model, **engine_options))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); outputs in prompt order.
        `sampling_params`: one SamplingParams for all prompts, or a list of them, one per prompt.

        Every prompt is tokenized (once) before any is queued, and a prompt the engine refuses
        aborts those queued before it, so a bad one leaves nothing behind.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = _per_prompt(sampling_params, len(prompts))
        token_ids = [tokenize(self.tokenizer, prompt) for prompt in prompts]
        ids = []
        try:
            for prompt, prompt_token_ids, p in zip(prompts, token_ids, params):
                text = prompt if isinstance(prompt, str) else None
                ids.append(self.engine.add_request(prompt_token_ids, p, prompt=text))
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation and generate."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template; use generate()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params = _per_prompt(sampling_params, len(conversations))
        prompts = [self.apply_chat_template(c) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm)

    def apply_chat_template(self, messages: Sequence[Message]) -> list[int]:
        """The conversation's prompt tokens (`apply_chat_template` with this LLM's tokenizer)."""
        return apply_chat_template(self.tokenizer, messages)

    def kv_stats(self) -> list[KVStats]:
        """Per instance: total / free / own / lent / borrowed KV blocks."""
        return self.engine.kv_stats()

    def shutdown(self) -> None:
        """Stop the worker processes of a multi-instance engine (also done at exit)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            try:
                while self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        if output.finished:
                            done[output.request_id] = output
                            bar.update(1)
            except BaseException:  # Ctrl-C or an error mid-run: leave no request behind
                for request_id in ids:
                    self.engine.abort_request(request_id)
                raise
        return [done[i] for i in ids]


def _per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    if not isinstance(params, Sequence) or isinstance(params, str):
        raise SamplingParamsError(_wrong_params(f"a {type(params).__name__}"))
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise SamplingParamsError(_wrong_params(f"a {type(p).__name__} at index {i}"))
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params


def _wrong_params(got: str) -> str:
    return (f"sampling_params must be a SamplingParams or a list of them (one per prompt), got "
            f"{got}; e.g. SamplingParams(max_tokens=5), not a dict")
