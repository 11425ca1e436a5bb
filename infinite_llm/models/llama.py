"""Llama 2/3, Mistral and Qwen2 in one file: plain math over a flat batch of tokens.

The model knows nothing of KV caches, blocks, instances or devices: each layer hands its RoPE'd
q/k/v to an `AttentionFn` supplied by the caller, which stores K/V wherever it likes and returns
the attention output. Tokens of many sequences are concatenated into one [T] batch; `positions` says
where each token sits in its own sequence.

q/k/v and gate/up are fused into single Linears (one matmul instead of three or two); the loader
fills the fused weights from Hugging Face's separate tensors. Parameters are created uninitialized
(nothing random is computed for weights the loader overwrites anyway). Each layer from `layers`
holds the backend of its device (torch, oneDNN, Triton), so this file is the math alone.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from infinite_llm.config import ModelConfig
from infinite_llm.models.layers import GateUpSiLU, Linear, RMSNorm, Rotary
from infinite_llm.models.rope import RopeTable, RotaryEmbedding


class AttentionFn(Protocol):
    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, num_heads, head_dim], k/v [T, num_kv_heads, head_dim], RoPE already applied
        -> out [T, num_heads, head_dim]."""
        ...


class LlamaAttention(nn.Module):
    def __init__(
        self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        hidden = config.hidden_size
        qkv_out = self.q_size + 2 * self.kv_size
        self.qkv_proj = Linear.empty(hidden, qkv_out, config.attention_bias, dtype, device)
        # Llama's attention_bias covers o_proj too; Qwen2 biases q/k/v only.
        o_bias = config.attention_bias and config.model_type == "llama"
        self.o_proj = Linear.empty(self.q_size, hidden, o_bias, dtype, device)
        self.rotary = Rotary(config.num_heads, config.num_kv_heads, device)

    def forward(self, rope: RopeTable, x: Tensor, attention: AttentionFn) -> Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        qk_size = self.q_size + self.kv_size
        qk = qkv[:, :qk_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(rope, qk)
        out = attention(self.layer, q, k, v)  # [T, num_heads, head_dim]
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.gate_up_proj = GateUpSiLU.empty(hidden, 2 * inter, False, dtype, device)
        self.down_proj = Linear.empty(inter, hidden, False, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gate_up_proj(x))  # gate_up_proj: SiLU(gate) * up


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, layer: int, config: ModelConfig, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.self_attn = LlamaAttention(layer, config, dtype, device)
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
            LlamaDecoderLayer(i, config, dtype, device) for i in range(config.num_layers)
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
        if config.tie_word_embeddings:  # the logits read the input embedding, as transformers'
            self.lm_head = Linear(self.model.embed_tokens.weight)
        else:
            self.lm_head = Linear.empty(config.hidden_size, config.vocab_size, False, dtype,
                                        device)

    def process_weights_after_loading(self) -> None:
        """Once the weights are loaded, every Linear takes the backend that needs them: oneDNN's
        packed copies of float32 CPU weights (as many bytes again as the linears' weights); a
        no-op elsewhere."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading()

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionFn) -> Tensor:
        """input_ids [T] int64, positions [T] -> final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, attention)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in the model's dtype (only the rows being
        sampled). Not cast to float32 here: the cast changes no order, so greedy rows take the
        argmax as it is, and the sampler casts only the rows that sample or want logprobs (at
        batch 256 the cast and the float32 argmax took 0.17 ms of a 20 ms step on an H100:
        `python -P benchmarks/decode_e2e.py --batches 256 --kernel-profile`)."""
        return self.lm_head(hidden)
