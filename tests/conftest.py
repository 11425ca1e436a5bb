"""Shared fixtures: tiny random-weight Hugging Face checkpoints and the real default model.

Tiny checkpoints are written with transformers itself (`save_pretrained`), so they are exactly
what a user's HF folder looks like, and they carry the default model's tokenizer (vocab 49152)
so text prompts work. Weights are seeded; their scale is chosen so greedy decoding wanders over
many tokens instead of repeating one, and so q/k/v biases and norm weights are not trivial.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from infinite_llm.models.loader import resolve_model

VOCAB_SIZE = 49152
# Layers weigh more than the embedding: with tied embeddings and small layer weights the residual
# stream stays close to the input token's embedding and greedy decoding repeats that token.
EMBED_STD, WEIGHT_STD = 0.1, 0.2
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
# One entry per architecture the model file supports; together they cover GQA, MQA and MHA,
# tied and untied embeddings, q/k/v biases, head_dim != hidden / heads and llama3 RoPE scaling.
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", num_hidden_layers=3, tie_word_embeddings=False),
    "llama3": dict(
        model_type="llama",
        tie_word_embeddings=True,
        # original_max_position_embeddings is small so the scaling changes frequencies that
        # matter at test lengths (with 8192 it would only touch wavelengths beyond them).
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mistral": dict(model_type="mistral", num_key_value_heads=1, head_dim=32),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=4, tie_word_embeddings=True),
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_tiny_checkpoint(arch: str, out: Path, tokenizer_from: Path | None = None) -> Path:
    """Save a seeded random `arch` model (float32) with transformers into `out`."""
    kwargs = {**_COMMON, **TINY_ARCHS[arch]}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(sorted(TINY_ARCHS).index(arch))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif "embed_tokens" in name or "lm_head" in name:
                param.normal_(0.0, EMBED_STD)
            else:
                param.normal_(0.0, WEIGHT_STD)
    model.save_pretrained(out)
    if tokenizer_from is not None:
        for name in _TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy(tokenizer_from / name, out / name)
    return out


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model converted to a safetensors folder (once per cache dir, ~30 s)."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, default_model_path: Path
) -> Callable[[str], Path]:
    """Factory: `tiny_checkpoint("llama" | "llama3" | "mistral" | "qwen2") -> folder`, built
    once per session and architecture."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in TINY_ARCHS:
            raise ValueError(f"unknown tiny arch {arch!r}; choose from {sorted(TINY_ARCHS)}")
        if arch not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[arch] = write_tiny_checkpoint(arch, out, tokenizer_from=default_model_path)
        return made[arch]

    return make
