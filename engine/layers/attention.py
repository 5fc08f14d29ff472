"""PagedAttention: write this step's K/V into the paged cache, then attend causally over the cache.

Constructed with the model's TOTAL head counts; it keeps this rank's heads by the same rule as
`QKVParallelLinear` (KV heads replicated when tp exceeds their count), so the q/k/v a fused
projection produces on a rank are exactly what this layer expects on that rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine import distributed
from engine.input_metadata import InputMetadata
from engine.kernels import dispatch
from engine.kv_cache import KVCache
from engine.layers.linear import kv_heads_for_rank


def alibi_slopes(total_num_heads: int) -> torch.Tensor:
    """The ALiBi head slopes (Press et al.), float32 `[total_num_heads]`, as BLOOM/MPT use them.

    For n a power of two, slope_h = 2^(-8(h+1)/n). Otherwise the first 2^floor(log2 n) heads take those
    slopes and the rest take every other slope of the sequence for twice that power of two.
    """
    closest_power_of_2 = 2 ** math.floor(math.log2(total_num_heads))
    base = 2.0 ** (-8.0 / closest_power_of_2)
    slopes = base ** torch.arange(1, closest_power_of_2 + 1, dtype=torch.float32)
    if closest_power_of_2 != total_num_heads:
        extra_base = 2.0 ** (-8.0 / (2 * closest_power_of_2))
        num_extra = total_num_heads - closest_power_of_2
        extra = extra_base ** torch.arange(1, 2 * num_extra + 1, 2, dtype=torch.float32)
        slopes = torch.cat([slopes, extra])
    return slopes


class PagedAttention(nn.Module):
    """Attention over a paged KV cache for a flattened batch mixing prefill chunks and decode tokens."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        """`sinks`: one learned logit per head of all ranks (`[num_heads]`), joining each softmax's
        denominator. Usually the attention module's own parameter, shared here so the checkpoint
        loads it under the module's name; each rank reads its heads' share at forward time."""
        super().__init__()
        tp_size, tp_rank = distributed.get_tp_size(), distributed.get_tp_rank()
        total_num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % total_num_kv_heads != 0:
            raise ValueError(
                f"number of attention heads ({num_heads}) is not a multiple of the number of "
                f"key/value heads ({total_num_kv_heads})"
            )
        self.total_num_heads = num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = distributed.divide(num_heads, tp_size, "number of attention heads")
        self.num_kv_heads, self.first_kv_head = kv_heads_for_rank(total_num_kv_heads, tp_size, tp_rank)
        self.first_head = tp_rank * self.num_heads
        self.head_dim = head_dim
        self.scale = float(scale)
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        if alibi_slopes is not None:
            if tuple(alibi_slopes.shape) != (num_heads,):
                raise ValueError(
                    f"alibi_slopes must hold one slope per head of all ranks ({num_heads}), "
                    f"got shape {tuple(alibi_slopes.shape)}"
                )
            first = tp_rank * self.num_heads
            alibi_slopes = alibi_slopes[first : first + self.num_heads].detach().clone().float()
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)
        if sinks is not None and tuple(sinks.shape) != (num_heads,):
            raise ValueError(
                f"sinks must hold one logit per head of all ranks ({num_heads}), got shape {tuple(sinks.shape)}"
            )
        if isinstance(sinks, nn.Parameter):
            self.sinks = sinks
        else:
            self.register_buffer("sinks", sinks, persistent=False)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCache,
        input_metadata: InputMetadata,
    ) -> torch.Tensor:
        """q/k/v `[T, heads*D]` or `[T, heads, D]` -> the output in the query's layout and dtype.

        Returning the query's rank keeps a port's own output reshape (`reshape(*shape[:-2], -1)`,
        `reshape(T, -1)`) meaning what it meant in the HF source.
        """
        num_tokens = query.shape[0]
        per_head = query.dim() == 3
        if (
            self.num_heads != self.total_num_heads
            and query.numel() == num_tokens * self.total_num_heads * self.head_dim
        ):
            # A projection the port kept replicated hands every rank all heads: take this rank's.
            query = query.reshape(num_tokens, self.total_num_heads, self.head_dim)
            query = query[:, self.first_head : self.first_head + self.num_heads]
            kv_heads = slice(self.first_kv_head, self.first_kv_head + self.num_kv_heads)
            key = key.reshape(num_tokens, self.total_num_kv_heads, self.head_dim)[:, kv_heads]
            value = value.reshape(num_tokens, self.total_num_kv_heads, self.head_dim)[:, kv_heads]
        query = query.reshape(num_tokens, self.num_heads, self.head_dim)
        key = key.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        dispatch.write_kv_cache(key, value, key_cache, value_cache, input_metadata.slot_mapping)
        output = dispatch.paged_attention(
            query,
            key_cache,
            value_cache,
            input_metadata,
            self.scale,
            self.alibi_slopes,
            self.sliding_window,
            self.logits_soft_cap,
            None if self.sinks is None else self.sinks[self.first_head : self.first_head + self.num_heads],
        )
        if per_head:
            return output.reshape(num_tokens, self.num_heads, self.head_dim)
        return output.reshape(num_tokens, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"scale={self.scale}, sliding_window={self.sliding_window}, "
            f"logits_soft_cap={self.logits_soft_cap}, alibi={self.alibi_slopes is not None}, "
            f"sinks={self.sinks is not None}"
        )


def cache_shape_of(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(attention layers, KV heads on this rank, key head size, value head size), read from the
    model's PagedAttention or MultiLatentAttention modules: the authority, whatever names the HF
    config uses (or lacks) for them. A latent cache is one row per token (`kv_lora_rank + rope` wide)
    and no value cache (value head size 0)."""
    from engine.layers.mla import MultiLatentAttention

    shapes = []
    for module in model.modules():
        if isinstance(module, PagedAttention):
            shapes.append((module.num_kv_heads, module.head_dim, module.head_dim))
        elif isinstance(module, MultiLatentAttention):
            shapes.append((1, module.cache_head_dim, 0))
    if not shapes:
        raise ValueError(f"{type(model).__name__} has no PagedAttention or MultiLatentAttention layers")
    if len(set(shapes)) != 1:
        raise ValueError(
            f"attention layers differ in KV heads/head sizes {sorted(set(shapes))}; one cache shape is needed"
        )
    return (len(shapes), *shapes[0])
