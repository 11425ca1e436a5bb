"""Llama 2/3, Mistral and Qwen2 in one file: plain math over a flat batch of tokens.

The model knows nothing of KV caches, blocks or instances: each layer hands its RoPE'd q/k/v to
an `AttentionFn` supplied by the caller, which stores K/V wherever it likes and returns the
attention output. Tokens of many sequences are concatenated into one [T] batch; `positions` says
where each token sits in its own sequence.

q/k/v and gate/up are fused into single Linears (one matmul instead of three or two); the loader
fills the fused weights from Hugging Face's separate tensors. Parameters are created uninitialized
(nothing random is computed for weights the loader overwrites anyway).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinite_llm.config import ModelConfig
from infinite_llm.models.rope import RopeTable, RotaryEmbedding

try:  # one-launch RMSNorm, RoPE and SiLU * up for CUDA tensors
    from infinite_llm.models import fused
except ImportError:  # no triton (CPU-only installs): the torch code below runs everywhere
    fused = None


class AttentionFn(Protocol):
    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim], RoPE already applied
        -> out [T, num_heads, head_dim]."""
        ...


# Rows for which a float32 product on CPU takes oneDNN's packed weight (the kernel torch.compile's
# CPU backend uses) instead of F.linear (MKL): decode batches. On a 2-core AVX2 CPU a step's
# products ran 1.01-1.82x faster there at 1-128 rows, and 0.93-0.94x at 1024
# (`python benchmarks/throughput.py --linears`: benchmarks/results/throughput_cpu.txt, run 10).
PACKED_ROWS = range(1, 129)


def pack_weight(weight: Tensor) -> Tensor | None:
    """oneDNN's blocked copy of a float32 CPU weight [N, K] for `linear`, or None where torch
    has no oneDNN linear for this CPU (then F.linear runs every product)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return None
    try:  # a private op: builds for other CPUs (or other torch versions) may lack it
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)  # for 32 rows
    except (AttributeError, RuntimeError):
        return None


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) by oneDNN, from `pack_weight(weight)`, with no activation fused."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
           packed: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias). 1-64 bf16/fp16 rows on CUDA (decode at batch 1-64) go to Triton
    where it reads the weights faster than cuBLAS does (a GEMV for one row; the split-K kernel
    on the matrices `splitk_tiles` names, else the tile kernel for 2-16 rows); `PACKED_ROWS`
    rows on CPU to oneDNN when the weight's `packed` copy is given; everything else to
    F.linear."""
    if packed is not None and x.shape[0] in PACKED_ROWS:
        return packed_linear(x, packed, bias)
    if fused is not None and x.is_cuda and fused.skinny_fits(x, weight):
        rows = x.shape[0]
        if rows == 1:
            return fused.gemv(x, weight, bias)
        tiles = fused.splitk_tiles(rows, *weight.shape)
        if tiles is not None:
            return fused.splitk_linear(x, weight, bias, *tiles)
        if rows <= fused.SKINNY_MAX_ROWS:
            return fused.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, so checkpoints load unchanged) through `linear`. `packed` is
    set by `LlamaForCausalLM.pack_cpu_weights`."""

    packed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


def _linear(
    n_in: int, n_out: int, bias: bool, dtype: torch.dtype, device: torch.device
) -> Linear:
    return nn.utils.skip_init(Linear, n_in, n_out, bias=bias, dtype=dtype, device=device)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as transformers does."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if fused is not None and x.is_cuda:
            return fused.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual += x`, then the norm of the sum (one kernel on CUDA). The add is
        commutative, so the residual stream has transformers' bits for `residual + x`."""
        if fused is not None and x.is_cuda:
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        residual += x
        return self(residual)


class LlamaAttention(nn.Module):
    def __init__(
        self,
        layer: int,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        hidden = config.hidden_size
        qkv_out = self.q_size + 2 * self.kv_size
        self.qkv_proj = _linear(hidden, qkv_out, config.attention_bias, dtype, device)
        # Llama's attention_bias covers o_proj too; Qwen2 biases q/k/v only.
        o_bias = config.attention_bias and config.model_type == "llama"
        self.o_proj = _linear(self.q_size, hidden, o_bias, dtype, device)
        self.rotary = rotary

    def forward(self, rope: RopeTable, x: Tensor, attention: AttentionFn) -> Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        qk_size = self.q_size + self.kv_size
        qk = qkv[:, :qk_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        if fused is not None and qk.is_cuda:
            q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
            fused.rotary_(rope.positions, q, k, self.rotary.cos, self.rotary.sin)
        else:  # q and k heads side by side: one rotation for both
            q, k = rope.rotate(qk).split((self.num_heads, self.num_kv_heads), dim=1)
        out = attention(self.layer, q, k, v)  # [T, num_heads, head_dim]
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = _linear(hidden, 2 * inter, False, dtype, device)
        self.down_proj = _linear(inter, hidden, False, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        if fused is not None and x.is_cuda:
            return self.down_proj(fused.silu_mul(self.gate_up_proj(x)))
        if len(x) == 1 or (self.gate_up_proj.packed is not None and len(x) in PACKED_ROWS):
            # A matrix-vector product, or oneDNN's packed product: one pass over the fused weight
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            h = F.silu(gate)  # one fresh contiguous [T, inter] buffer, then multiplied in place
        else:
            # Several rows: gate and up as two products into two outputs, as transformers runs
            # them; MKL runs the fused width slower (seen in the torch profiler at batch 32 on a
            # 2-core CPU; the end-to-end runs are in benchmarks/results/throughput_cpu.txt).
            gate_weight, up_weight = self.gate_up_proj.weight.chunk(2)
            h = F.silu(linear(x, gate_weight), inplace=True)
            up = linear(x, up_weight)
        h *= up
        return self.down_proj(h)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        layer: int,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.self_attn = LlamaAttention(layer, config, rotary, dtype, device)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.mlp = LlamaMLP(config, dtype, device)

    def forward(self, rope: RopeTable, x: Tensor, residual: Tensor | None,
                attention: AttentionFn) -> tuple[Tensor, Tensor]:
        """x is the previous layer's MLP output, not yet added to the residual stream (the
        embeddings, with `residual` None, for the first layer): each add is done by the norm
        that reads its sum. Returns this layer's MLP output and the residual stream."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm.add(x, residual)
        h = self.self_attn(rope, h, attention)
        return self.mlp(self.post_attention_layernorm.add(h, residual)), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = nn.utils.skip_init(
            nn.Embedding, config.vocab_size, config.hidden_size, dtype=dtype, device=device
        )
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.max_position_embeddings,
            device,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(i, config, self.rotary, dtype, device)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionFn) -> Tensor:
        h = self.embed_tokens(input_ids)
        rope = self.rotary.at(positions, h.dtype)  # shared by every layer
        residual = None
        for layer in self.layers:
            h, residual = layer(rope, h, residual, attention)
        assert residual is not None  # a model has layers
        return self.norm.add(h, residual)


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM; parameter names mirror Hugging Face's except the fused projections."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, device)
        self.lm_head: Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, dtype, device)
        self._tied_packed: Tensor | None = None  # the embedding packed for the logits

    def pack_cpu_weights(self) -> None:
        """Give every Linear (and tied logits) a packed copy for `linear`'s oneDNN path, after
        the weights are loaded; a no-op off CPU or float32. The copies hold as many bytes again
        as the linears' weights."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = pack_weight(module.weight)
        if self.lm_head is None:
            self._tied_packed = pack_weight(self.model.embed_tokens.weight)

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionFn) -> Tensor:
        """input_ids [T] int64, positions [T] -> final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, attention)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in the model's dtype (only the rows being
        sampled). Not cast to float32 here: the cast changes no order, so greedy rows take the
        argmax as it is, and the sampler casts only the rows that sample or want logprobs (at
        batch 256 the cast and the float32 argmax took 0.17 ms of a 20 ms step on an H100:
        decode_e2e_h100.txt run 17)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return linear(hidden, self.model.embed_tokens.weight, packed=self._tied_packed)
