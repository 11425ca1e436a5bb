"""A tiny random-weight Llama checkpoint for benchmarks and calibration on CPU.

Written with transformers itself (`save_pretrained`), so the engine loads it through the same path
as a user's Hugging Face folder. No tokenizer: benchmarks send token ids. The shape is small
enough that a CPU step costs milliseconds (so a trace of hundreds of requests replays in minutes)
while the KV cache is still a real paged cache with GQA; weights are seeded so every run of a
benchmark uses the same model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def describe(config: dict[str, Any] = TINY_LLAMA) -> str:
    return (f"tiny random Llama: {config['num_hidden_layers']} layers, hidden "
            f"{config['hidden_size']}, {config['num_attention_heads']} heads / "
            f"{config['num_key_value_heads']} KV heads x {config['head_dim']}, vocab "
            f"{config['vocab_size']}, float32")


def write_tiny_llama(out: str | Path, seed: int = 0) -> Path:
    """Save the seeded tiny Llama (float32) into `out` and return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **TINY_LLAMA)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out)
    model.save_pretrained(out)
    return out
