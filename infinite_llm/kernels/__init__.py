"""Every Triton GPU kernel of the engine, with its tuning tables.

- `attention`: the attention ops with `infinite_llm.attention.reference`'s signatures (the KV
  store, paged decode and prefill attention, the LSE merge), built from `store`, `decode`,
  `prefill` and `merge`, which share `common`'s online-softmax and launch pieces;
- `elementwise`: RMSNorm (alone, or after the residual add), RoPE and SiLU(gate) * up;
- `linear`: the decode-sized linears (GEMV, tile and split-K kernels, and `splitk_tiles`).

Importing this package imports nothing; each module imports triton, so only code that runs on a
CUDA device imports them (`infinite_llm.attention.attention_ops`, `infinite_llm.models.layers`).
"""
