"""Plain PyTorch multi-latent attention (MLA) over a paged latent cache: the CPU path and the oracle.

The cache holds one row per token, `[latent | rotated rope key]` (`kv_lora_rank + rope_dim` wide, a
single "KV head"). Attention runs in the latent space: a query already multiplied by the key
up-projection (`q_nope @ W_UK`), concatenated with its rotated rope part, scores against the rows,
and the probabilities weight the rows' latent part. The value up-projection is applied afterwards
by the caller. `expanded_latent_attention` computes the same thing the way the source model does
(K/V expanded per head from the latent), for the tests.
"""

from __future__ import annotations

import torch

from engine.input_metadata import InputMetadata
from engine.kernels.reference import gather_sequence_kv, paged_attention_reference


def write_latent_cache(rows: torch.Tensor, latent_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Writes each token's `[latent | rope key]` row `[T, 1, D]` into `[blocks, block_size, 1, D]`; slot -1 skipped."""
    if rows.dim() != 3 or tuple(rows.shape[1:]) != tuple(latent_cache.shape[2:]):
        raise ValueError(
            f"latent rows must be [T, {latent_cache.shape[2]}, {latent_cache.shape[3]}], got {tuple(rows.shape)}"
        )
    if rows.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"{rows.shape[0]} latent rows for {slot_mapping.shape[0]} slots")
    block_size = latent_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    latent_cache[slots // block_size, slots % block_size] = rows[keep].to(latent_cache.dtype)


def latent_attention_reference(
    query: torch.Tensor,
    latent_cache: torch.Tensor,
    input_metadata: InputMetadata,
    scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """Causal attention of absorbed queries `[T, H, kv_lora_rank + rope_dim]` over the latent cache ->
    `[T, H, kv_lora_rank]`: every head reads the one cached row per token, the latent part as value."""
    if query.dim() != 3 or query.shape[-1] != latent_cache.shape[-1] or latent_cache.shape[2] != 1:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit a latent cache {tuple(latent_cache.shape)}"
        )
    # One "KV head" shared by every query head (MQA); the values are the rows themselves.
    output = paged_attention_reference(query, latent_cache, latent_cache, input_metadata, scale)
    return output[..., :kv_lora_rank]


def expanded_latent_attention(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latents: list[torch.Tensor],
    rope_keys: list[torch.Tensor],
    up_projection: torch.Tensor,
    query_lens: list[int],
    scale: float,
    v_head_dim: int,
) -> torch.Tensor:
    """MLA as the source model computes it, one sequence at a time: each sequence's latents
    `[S, kv_lora_rank]` expanded by `up_projection` (`[H * (nope + v), kv_lora_rank]`) into per-head
    keys (joined with the shared rope key `[S, rope_dim]`) and values, then causal attention of its
    last `query_lens[i]` tokens (`q_nope` `[T, H, nope]`, `q_rope` `[T, H, rope_dim]`) -> `[T, H, v]`."""
    num_heads, nope = q_nope.shape[1], q_nope.shape[2]
    outputs, start = [], 0
    for latent, rope_key, query_len in zip(latents, rope_keys, query_lens):
        context = latent.shape[0]
        expanded = (latent.float() @ up_projection.float().t()).view(context, num_heads, nope + v_head_dim)
        keys = torch.cat([expanded[..., :nope], rope_key.float()[:, None, :].expand(-1, num_heads, -1)], -1)
        values = expanded[..., nope:]
        queries = torch.cat(
            [q_nope[start : start + query_len], q_rope[start : start + query_len]], -1
        ).float()
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        query_pos = torch.arange(context - query_len, context)[:, None]
        scores = scores.masked_fill(torch.arange(context)[None, :] > query_pos, float("-inf"))
        outputs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), values))
        start += query_len
    return torch.cat(outputs).to(q_nope.dtype)


def gather_latents(
    latent_cache: torch.Tensor, block_table: torch.Tensor, context_len: int, kv_lora_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's cached latents `[S, kv_lora_rank]` and rope keys `[S, rope_dim]`, in order."""
    rows = gather_sequence_kv(latent_cache, block_table, context_len)[:, 0]
    return rows[:, :kv_lora_rank], rows[:, kv_lora_rank:]
