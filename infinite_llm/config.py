"""Configuration dataclasses, validated once when they are built.

A part takes the config it needs (the model needs `ModelConfig`, the pool needs `CacheConfig`),
never one object that carries everything.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch


class ConfigError(ValueError):
    """A configuration value is invalid or unsupported."""


SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face configs spell it (default, linear, llama3)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-family model, read from a Hugging Face `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict; accepts transformers 4 and 5 spellings of RoPE fields."""
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
            )
        # transformers >= 5 writes `rope_parameters` (holding rope_theta); older writes both
        # a top-level `rope_theta` and an optional `rope_scaling` dict.
        rope = dict(cfg.get("rope_parameters") or {})
        rope.update(cfg.get("rope_scaling") or {})
        rope_theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(f"rope_scaling type {rope_type!r} is not supported")
        # The model file implements exactly these; anything else would load and run silently wrong.
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0 or cfg.get("mlp_bias", False):
            raise ConfigError("partial_rotary_factor != 1 and mlp_bias are not supported")
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", 8192)
            ),
        )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        # Qwen2 always has q/k/v biases; Llama/Mistral may declare them with attention_bias.
        bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            sliding_window=int(window) if window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


LOAD_FORMATS = ("auto", "dummy")  # read the safetensors; or seeded random weights
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What a user may set on `LLM(...)`; every field is checked in `__post_init__`.

    `num_instances` ranks each hold a KV pool; `kv_mode` "pooled" lets a request's KV spread over
    them, "static" keeps every request on its owner (independent replicas). A worker that does not
    answer within `worker_timeout_s` fails the engine with an error instead of a hang.
    `num_kv_blocks` is per instance; when None the pool takes `kv_cache_fraction` of the device's
    memory (GPU: 0.9 of the memory free after the weights; CPU: 0.02 of the machine's RAM).
    `load_format` "dummy" fills the weights with seeded random values instead of reading them, so
    the model folder needs only config.json (benchmarks; vLLM's `load_format="dummy"`).
    On CUDA, plain decode steps replay CUDA graphs unless `enforce_eager` (vLLM's name); with
    `async_scheduling` (vLLM's name) and one instance, the next decode step is queued on the GPU
    before this step's tokens reach the host, so the host's work between steps overlaps the GPU's.
    `data_backend` carries the instances' tensors: "auto" is NCCL on CUDA and gloo on CPU; "gloo"
    on CUDA lets several instances share one GPU (NCCL refuses that), for tests.
    """

    model: str | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_fraction: float | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    num_instances: int = 1
    kv_mode: str = "pooled"
    worker_timeout_s: float = 300.0
    load_format: str = "auto"
    enforce_eager: bool = False
    async_scheduling: bool = True
    data_backend: str = "auto"

    def __post_init__(self) -> None:
        # From Python a count may come as 2.5, "2" or None; checked here, not as a TypeError
        # deep inside the start (num_instances=2.5 reached `range` when spawning workers).
        for name in ("block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs",
                     "max_model_len", "seed", "num_instances"):
            value = getattr(self, name)
            if value is None and name in ("num_kv_blocks", "max_model_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_fraction is not None and not 0.0 < self.kv_cache_fraction < 1.0:
            raise ConfigError(f"kv_cache_fraction must be in (0, 1), got {self.kv_cache_fraction}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be >= 1")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(
                f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if self.num_instances < 1:
            raise ConfigError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.kv_mode not in ("pooled", "static"):
            raise ConfigError(f"kv_mode must be 'pooled' or 'static', got {self.kv_mode!r}")
        if not self.worker_timeout_s > 0:
            raise ConfigError("worker_timeout_s must be > 0")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.data_backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(
                f"data_backend must be 'auto', 'nccl' or 'gloo', got {self.data_backend!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        # Here rather than at first use, where a missing GPU is a ZeroDivisionError or NCCL's
        # "not built in" deep inside the process group's start.
        device = self.torch_device
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {self.device!r} is not available: torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s) here")
        if self.data_backend == "nccl" and device.type != "cuda":
            raise ConfigError("data_backend 'nccl' needs device 'cuda'; on CPU use 'gloo'")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_data_backend(self) -> str:
        if self.data_backend == "auto":
            return "nccl" if self.torch_device.type == "cuda" else "gloo"
        return self.data_backend

    @property
    def torch_dtype(self) -> torch.dtype:
        """float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPU, unless set."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
