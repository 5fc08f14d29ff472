"""MultiLatentAttention: the absorbed computation over the latent cache against the expanded one."""

from __future__ import annotations

import pytest
import torch

from engine.input_metadata import InputMetadata
from engine.kernels.mla_reference import expanded_latent_attention, gather_latents, write_latent_cache
from engine.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from engine.layers import ReplicatedLinear
from engine.layers.attention import cache_shape_of
from engine.layers.mla import MultiLatentAttention

HEADS, NOPE, ROPE, V, RANK, BLOCK_SIZE = 4, 16, 8, 12, 32, 4


def _layer(seed: int = 0) -> tuple[MultiLatentAttention, ReplicatedLinear]:
    torch.manual_seed(seed)
    up = ReplicatedLinear(RANK, HEADS * (NOPE + V), bias=False)
    up.weight.data.normal_(0, 0.2)
    return MultiLatentAttention(HEADS, NOPE, ROPE, V, RANK, (NOPE + ROPE) ** -0.5, up), up


def _inputs(num_tokens: int, generator: torch.Generator):
    return (
        torch.randn(num_tokens, HEADS, NOPE, generator=generator),
        torch.randn(num_tokens, HEADS, ROPE, generator=generator),
        torch.randn(num_tokens, RANK, generator=generator),
        torch.randn(num_tokens, ROPE, generator=generator),
    )


def test_prefill_then_mixed_decode_match_the_expanded_attention():
    """Two sequences with shuffled blocks: a prefill step, then a step where one decodes a token and
    the other prefills a chunk; each against K/V expanded from every latent the sequence has seen."""
    layer, up = _layer()
    generator = torch.Generator().manual_seed(1)
    cache = allocate_kv_caches(1, 12, BLOCK_SIZE, 1, RANK + ROPE, torch.float32, "cpu", value_head_dim=0)[0]
    cache[0].fill_(float("nan"))  # every row read must have been written
    tables = [[7, 2, 9, 4], [1, 11, 5, 0]]
    latents, rope_keys = [[], []], [[], []]  # per sequence, each step's
    for query_lens, context_lens in (([5, 3], [5, 3]), ([1, 6], [6, 9]), ([1, 1], [7, 10])):
        metadata = InputMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE)
        q_nope, q_pe, latent, k_pe = _inputs(sum(query_lens), generator)
        output = layer(q_nope, q_pe, latent, k_pe, cache, metadata)
        start = 0
        for seq, length in enumerate(query_lens):
            latents[seq].append(latent[start : start + length])
            rope_keys[seq].append(k_pe[start : start + length])
            start += length
        expected = expanded_latent_attention(
            q_nope,
            q_pe,
            [torch.cat(steps) for steps in latents],
            [torch.cat(steps) for steps in rope_keys],
            up.weight,
            query_lens,
            layer.scale,
            V,
        )
        assert output.shape == (sum(query_lens), HEADS * V)
        torch.testing.assert_close(output, expected.reshape(-1, HEADS * V), rtol=1e-5, atol=1e-5)


def test_cache_rows_hold_the_latent_then_the_rope_key():
    layer, _ = _layer()
    generator = torch.Generator().manual_seed(2)
    cache = allocate_kv_caches(1, 4, BLOCK_SIZE, 1, RANK + ROPE, torch.float32, "cpu", value_head_dim=0)[0]
    metadata = InputMetadata.build([6], [6], [[3, 1]], BLOCK_SIZE)
    q_nope, q_pe, latent, k_pe = _inputs(6, generator)
    layer(q_nope, q_pe, latent, k_pe, cache, metadata)
    cached_latent, cached_rope = gather_latents(cache[0], metadata.block_tables[0], 6, RANK)
    torch.testing.assert_close(cached_latent, latent)
    torch.testing.assert_close(cached_rope, k_pe)
    assert cache[1].numel() == 0


def test_cache_shape_and_block_bytes_follow_the_latent_row():
    model = torch.nn.ModuleList([_layer()[0], _layer(1)[0]])
    assert cache_shape_of(model) == (2, 1, RANK + ROPE, 0)
    # One row of kv_lora_rank + rope per token per layer, no value row.
    assert (
        kv_cache_bytes_per_block(2, BLOCK_SIZE, 1, RANK + ROPE, torch.float32, 0) == 2 * BLOCK_SIZE * 40 * 4
    )


def test_bad_up_projection_and_rows_are_refused():
    with pytest.raises(ValueError, match="kv_b_proj weight"):
        MultiLatentAttention(
            HEADS, NOPE, ROPE, V, RANK, 1.0, ReplicatedLinear(RANK, HEADS * NOPE, bias=False)
        )
    cache = torch.zeros(2, BLOCK_SIZE, 1, RANK + ROPE)
    with pytest.raises(ValueError, match="latent rows"):
        write_latent_cache(torch.zeros(3, 1, RANK), cache, torch.arange(3))
