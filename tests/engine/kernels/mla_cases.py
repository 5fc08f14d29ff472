"""Checks of the Triton multi-latent attention kernels against the PyTorch reference, shared by the
interpreter test (CPU) and the GPU test: a step scattered over shuffled cache blocks, earlier rows
already cached, NaN-poisoned outputs and unwritten rows, a float32 reference."""

from __future__ import annotations

import torch

from engine.input_metadata import InputMetadata
from engine.kernels import triton_mla
from engine.kernels.mla_reference import latent_attention_reference, write_latent_cache

TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def check_latent_attention(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    rank: int,
    rope: int,
    dtype: torch.dtype,
    device: str,
    block_size: int = 16,
    seed: int = 0,
) -> None:
    """Writes the step's rows with the Triton write, attends with the Triton kernel, and compares both
    with the reference (which reads the rows the reference write put in a second cache)."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    order = torch.randperm(sum(blocks_per_seq) + 2, generator=generator).tolist()
    tables, start = [], 0
    for count in blocks_per_seq:
        tables.append(order[start : start + count])
        start += count
    width = rank + rope
    shape = (len(order), block_size, 1, width)
    cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    # Rows cached before this step, the same in both caches.
    earlier = [c - q for q, c in zip(query_lens, context_lens)]
    if sum(earlier):
        seqs = [i for i, e in enumerate(earlier) if e]
        prefix = InputMetadata.build(
            [earlier[i] for i in seqs],
            [earlier[i] for i in seqs],
            [tables[i] for i in seqs],
            block_size,
            device,
        )
        rows = torch.randn(sum(earlier), 1, width, generator=generator).to(device, dtype)
        write_latent_cache(rows, cache, prefix.slot_mapping)
    reference_cache = cache.clone()
    metadata = InputMetadata.build(query_lens, context_lens, tables, block_size, device)
    rows = torch.randn(sum(query_lens), 1, width, generator=generator).to(device, dtype)
    triton_mla.write_latent_rows(rows, cache, metadata.slot_mapping)
    write_latent_cache(rows, reference_cache, metadata.slot_mapping)
    assert torch.equal(cache.isnan(), reference_cache.isnan())
    torch.testing.assert_close(cache.nan_to_num(), reference_cache.nan_to_num(), rtol=0, atol=0)

    query = torch.randn(sum(query_lens), num_heads, width, generator=generator).to(device, dtype)
    scale = width**-0.5
    output = triton_mla.latent_attention(
        query, cache, metadata.block_tables, metadata.context_lens, metadata.query_start_loc, scale, rank
    )
    expected = latent_attention_reference(query.float(), reference_cache.float(), metadata, scale, rank)
    assert output.dtype == dtype and output.shape == (sum(query_lens), num_heads, rank)
    assert not output.isnan().any(), "the kernel read a row it should not have"
    error = ((output.float() - expected).abs().max() / expected.abs().max()).item()
    assert error < TOLERANCE[dtype], (
        f"max error {error:.2e} relative to the largest output ({dtype}, {query_lens}, {context_lens})"
    )
