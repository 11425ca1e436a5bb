"""Paged KV cache: the block pool of one instance and its rManager."""
