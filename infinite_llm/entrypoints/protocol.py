"""OpenAI request bodies (pydantic) and their translation to `SamplingParams`.

Only what the engine can honour is accepted: a field whose non-default value would be silently
ignored (penalties, logit_bias, n > 1, echo, best_of, a JSON response_format, tools) is rejected
with a 400 instead. Unknown fields are ignored, as OpenAI's and vLLM's servers do, so newer
clients keep working. Value ranges are checked by `SamplingParams`; the pydantic fields repeat
the simple bounds so that the OpenAPI schema documents them (and a schema-driven client or fuzzer
can keep to them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infinite_llm.sampling import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    """An error the server answers with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions (vLLM's extras: top_k, ignore_eos,
    stop_token_ids)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int | None = Field(1, ge=1, le=1, description="only 1")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    ignore_eos: bool | None = False
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        """The output length the client asked for; None when it left it to the default."""
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises `SamplingParamsError` (a 400) for a bad value, `APIError` for an unsupported
        one."""
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true",
                              "stream_options")
        if self.n not in (None, 1):
            raise bad_request(f"n must be 1 (only one choice per request), got {self.n}", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise bad_request(f"{name} is not supported (only 0)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens,
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt` is text or token ids, or a list of several prompts (one
    choice each, in order)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts in order: one text or token-id list, or a list of several."""
        prompt = self.prompt
        if not prompt or isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]  # empty: the engine says so
        return list(prompt)  # type: ignore[arg-type]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if "max_tokens" in self.model_fields_set else None

    def sampling_params(self) -> SamplingParams:
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.best_of not in (None, 1):
            raise bad_request("best_of must be 1", "best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """As chat templates expect it: `developer` is the newer name of `system`."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. `max_completion_tokens` wins over the older `max_tokens`;
    with neither, the answer may run up to the model's length limit (as OpenAI's does)."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None  # tools' deprecated predecessor

    def sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise bad_request("messages must not be empty", "messages")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("response_format is not supported (no guided decoding): only "
                              '{"type": "text"}', "response_format")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise bad_request(f"{name} are not supported (no tool calling)", name)
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
        return self._sampling_params(
            self.requested_max_tokens, (self.top_logprobs or 0) if self.logprobs else None
        )

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"
