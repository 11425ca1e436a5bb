"""Configuration dataclasses, validated once when they are built.

A part takes the config it needs (the model needs `ModelConfig`, the pool needs `CacheConfig`),
never one object that carries everything. `EngineConfig` is the four parts a user sets (model
loading, cache, scheduler, cluster); `LLM(model, **options)`, the CLI flags and the server's flags
all name the parts' fields flat (`block_size`, `max_num_seqs`, ...), as vLLM's do, and each
field's `help` is its flag's help.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
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


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field whose flag and docs say `help` (and `choices`)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check_ints(config: Any, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """From Python a count may come as 2.5, "2" or None; checked here, not as a TypeError deep
    inside the start (num_instances=2.5 reached `range` when spawning workers)."""
    for name in names:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name} must be an integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """The model part: which model, how its weights load, where and in what dtype it runs."""

    model: str | None = _option(None, "a Hugging Face folder or a .gguf file (default: the "
                                "bundled SmolLM2-135M-Instruct)")
    dtype: str = _option("auto", "weights and KV dtype; auto = float32 on CPU, bfloat16 on GPU",
                         ("auto", *_DTYPES))
    device: str = _option("auto", "auto, cpu, cuda or cuda:N")
    seed: int = _option(0, "seed of the dummy weights and of requests without their own seed")
    load_format: str = _option("auto", "auto reads the weights; dummy fills them with seeded "
                               "random values (only config.json needed)", LOAD_FORMATS)
    max_model_len: int | None = _option(None, "longest prompt + output (default: the model's "
                                        "limit, capped by what the KV cache holds)")

    def __post_init__(self) -> None:
        _check_ints(self, ("seed", "max_model_len"), optional=("max_model_len",))
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be >= 1")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(
                f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        # Here rather than at first use, where a missing GPU is a ZeroDivisionError or NCCL's
        # "not built in" deep inside the process group's start.
        device = self.torch_device
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {self.device!r} is not available: torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s) here")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPU, unless set."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The KV cache of each instance: block size and pool size."""

    block_size: int = _option(16, "tokens per KV block (a power of two)")
    num_kv_blocks: int | None = _option(None, "KV blocks per instance (default: "
                                        "kv_cache_fraction of the memory)")
    kv_cache_fraction: float | None = _option(None, "share of memory for the KV pool: of the "
                                              "GPU memory free after the weights (0.9), or of "
                                              "RAM on CPU (0.02)")

    def __post_init__(self) -> None:
        _check_ints(self, ("block_size", "num_kv_blocks"), optional=("num_kv_blocks",))
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_fraction is not None and not 0.0 < self.kv_cache_fraction < 1.0:
            raise ConfigError(f"kv_cache_fraction must be in (0, 1), got {self.kv_cache_fraction}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """How each instance batches and runs its steps."""

    max_num_batched_tokens: int = _option(2048, "token budget of one step (decodes first, "
                                          "then prefill chunks)")
    max_num_seqs: int = _option(128, "most requests running at once per instance")
    enforce_eager: bool = _option(False, "on CUDA, run every step eagerly (no CUDA graphs)")
    async_scheduling: bool = _option(True, "on CUDA with one instance, queue the next decode "
                                     "step before this step's tokens reach the host")

    def __post_init__(self) -> None:
        _check_ints(self, ("max_num_batched_tokens", "max_num_seqs"))
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be >= 1")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The instances and how their KV is pooled. `kv_mode` "pooled" lets a request's KV spread
    over the instances, "static" keeps every request on its owner (independent replicas). A
    worker that does not answer within `worker_timeout_s` fails the engine with an error
    instead of a hang. `data_backend` carries the instances' tensors: "auto" is NCCL on CUDA
    and gloo on CPU; "gloo" on CUDA lets several instances share one GPU (NCCL refuses that)."""

    num_instances: int = _option(1, "instances (ranks), each with its own KV pool")
    kv_mode: str = _option("pooled", "pooled: a request's KV may spread over instances; "
                           "static: each request stays on its owner", ("pooled", "static"))
    worker_timeout_s: float = _option(300.0, "seconds a worker may stay silent before the "
                                      "engine fails with WorkerError")
    data_backend: str = _option("auto", "torch.distributed backend of the tensors",
                                ("auto", "nccl", "gloo"))

    def __post_init__(self) -> None:
        _check_ints(self, ("num_instances",))
        if self.num_instances < 1:
            raise ConfigError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.kv_mode not in ("pooled", "static"):
            raise ConfigError(f"kv_mode must be 'pooled' or 'static', got {self.kv_mode!r}")
        if not self.worker_timeout_s > 0:
            raise ConfigError("worker_timeout_s must be > 0")
        if self.data_backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(
                f"data_backend must be 'auto', 'nccl' or 'gloo', got {self.data_backend!r}")


_PARTS = {"load": LoadConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
          "cluster": ClusterConfig}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What a user may set on `LLM(...)`, in four parts; each part checks its own fields and
    this checks what spans two parts."""

    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.cluster.data_backend == "nccl" and self.load.torch_device.type != "cuda":
            raise ConfigError("data_backend 'nccl' needs device 'cuda'; on CPU use 'gloo'")

    @staticmethod
    def option_groups() -> dict[str, tuple[dataclasses.Field, ...]]:
        """The options a user sets, by part ("load", "cache", "scheduler", "cluster")."""
        return {name: dataclasses.fields(part) for name, part in _PARTS.items()}

    @staticmethod
    def option_fields() -> list[dataclasses.Field]:
        """Every option a user sets, across the parts (names are unique across them)."""
        return [f for fields in EngineConfig.option_groups().values() for f in fields]

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """The config from flat options (`block_size=32, num_instances=2, ...`), with a clear
        error for an unknown one."""
        known = {f.name for f in cls.option_fields()}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown engine options {unknown}; known: {sorted(known)}")
        return cls(**{
            name: part(**{f.name: options[f.name] for f in dataclasses.fields(part)
                          if f.name in options})
            for name, part in _PARTS.items()})

    def options(self) -> dict[str, Any]:
        """The flat options this config was made from (`from_options(**c.options()) == c`)."""
        return {f.name: getattr(getattr(self, name), f.name)
                for name, part in _PARTS.items() for f in dataclasses.fields(part)}

    @property
    def torch_data_backend(self) -> str:
        if self.cluster.data_backend == "auto":
            return "nccl" if self.load.torch_device.type == "cuda" else "gloo"
        return self.cluster.data_backend
