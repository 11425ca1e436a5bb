"""Model definitions (plain math) and the loader that fills them from checkpoints."""

from infinite_llm.models.llama import AttentionFn, LlamaForCausalLM
from infinite_llm.models.loader import (
    ModelNotFoundError,
    load_model,
    load_model_config,
    load_tokenizer,
    resolve_model,
)

__all__ = [
    "AttentionFn",
    "LlamaForCausalLM",
    "ModelNotFoundError",
    "load_model",
    "load_model_config",
    "load_tokenizer",
    "resolve_model",
]
