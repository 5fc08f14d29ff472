"""The paged KV cache: per attention layer, a key and a value tensor of fixed-size blocks.

Layout (K and V alike): `[num_blocks, block_size, num_kv_heads_per_rank, head_dim]`. A token's
vectors live at `cache[slot // block_size, slot % block_size]`, so writing one token is one
contiguous `num_kv_heads * head_dim` row, and a block is one contiguous chunk that a decode kernel
reads in a single pass for every query head of its group. Multi-latent attention caches one row of
`kv_lora_rank + rope` per token in the key tensor and nothing in the value tensor (`value_head_dim`
0), so its blocks cost what its rows do.
"""

from __future__ import annotations

import torch

KVCache = tuple[torch.Tensor, torch.Tensor]

DEFAULT_BLOCK_SIZE = 16


def allocate_kv_caches(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    value_head_dim: int | None = None,
) -> list[KVCache]:
    """One (key, value) pair per attention layer, zero-filled; values `value_head_dim` wide (default `head_dim`)."""
    key_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    value_shape = (*key_shape[:3], head_dim if value_head_dim is None else value_head_dim)
    return [
        (
            torch.zeros(key_shape, dtype=dtype, device=device),
            torch.zeros(value_shape, dtype=dtype, device=device),
        )
        for _ in range(num_layers)
    ]


def kv_cache_bytes_per_block(
    num_layers: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    value_head_dim: int | None = None,
) -> int:
    """Bytes one block costs across all layers, K and V: what sizing the cache divides by."""
    element = torch.empty((), dtype=dtype).element_size()
    width = head_dim + (head_dim if value_head_dim is None else value_head_dim)
    return num_layers * block_size * num_kv_heads * width * element
