"""Plain PyTorch paged attention: the CPU path and the oracle every CUDA/Triton kernel is tested against.

Written for clarity, one sequence at a time, in float32; see `engine/input_metadata.py` for what the
metadata means (which KV index each new token sits at, where its K/V are written).
"""

from __future__ import annotations

import torch

from engine.input_metadata import InputMetadata


def write_kv_cache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes each token's key/value `[T, KV, D]` into the caches `[blocks, block_size, KV, D]` at its slot.

    Slots of -1 are skipped (padding tokens).
    """
    block_size = key_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)


def gather_sequence_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first `context_len` tokens of one sequence's cache, `[context_len, KV, D]`, in order."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:context_len]


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    input_metadata: InputMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens `[T, H, D]` over its cached context -> `[T, H, D]`.

    Scores are `scale * q.k`, plus `slope_h * (k_idx - q_idx)` with ALiBi, then soft-capped
    (`cap * tanh(s / cap)`), then masked: causal, and within `sliding_window` (`q_idx - k_idx < window`).
    Query head h reads KV head `h // (H / KV)` (GQA/MQA). With `sinks` `[H]`, head h's softmax
    denominator also holds `exp(sinks[h])`: a logit with no value, which lets a head attend to nothing.
    """
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    output = torch.empty_like(query)
    start = 0
    for seq, (query_len, context_len) in enumerate(
        zip(input_metadata.query_lens_host, input_metadata.context_lens_host)
    ):
        block_table = input_metadata.block_tables[seq]
        keys = gather_sequence_kv(key_cache, block_table, context_len).float()
        values = gather_sequence_kv(value_cache, block_table, context_len).float()
        keys = keys.repeat_interleave(group, dim=1)  # [ctx, H, D]
        values = values.repeat_interleave(group, dim=1)
        queries = query[start : start + query_len].float()  # [q, H, D]

        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        query_pos = torch.arange(context_len - query_len, context_len, device=query.device)
        key_pos = torch.arange(context_len, device=query.device)
        distance = query_pos[:, None] - key_pos[None, :]  # [q, k], >= 0 where visible
        if alibi_slopes is not None:
            scores = scores - alibi_slopes.float()[:, None, None] * distance
        if logits_soft_cap is not None:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        visible = distance >= 0
        if sliding_window is not None:
            visible &= distance < sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink_column = sinks.float()[:, None, None].expand(-1, query_len, 1)
            probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        output[start : start + query_len] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
        start += query_len
    return output
