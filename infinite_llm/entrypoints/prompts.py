"""A user's prompt as token ids: text through the tokenizer, a conversation through its chat
template.

The Python API (`LLM`) and the server both turn each prompt into token ids here, once, and hand
the ids down: the engine takes token ids only (and checks that they are in the vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2

from infinite_llm.engine.engine import RequestError

Message = dict[str, str]


def tokenize(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    """The prompt's token ids: text is encoded with `tokenizer`, token ids are kept as given.

    A str no tokenizer takes is a RequestError, not the tokenizer's TypeError: a lone surrogate
    (JSON's escape \\ud800 decodes to one)."""
    if not isinstance(prompt, str):
        return list(prompt)
    if tokenizer is None:
        raise RequestError("this model folder has no tokenizer: pass token ids")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"the prompt is not valid Unicode text ({e.reason} at character "
                           f"{e.start})") from e
    return tokenizer.encode(prompt)


def apply_chat_template(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The conversation's prompt tokens, ready for the assistant's turn; a RequestError when the
    template rejects the messages (a missing role, a content that isn't text), not jinja's own
    error."""
    try:
        ids = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise RequestError(f"the chat template rejected the messages: {e}") from e
    return list(ids)
