"""Paged attention inputs and checks against the PyTorch reference, on any device.

Shared by tests/gpu/test_kernels.py (the CUDA and Triton kernels on a GPU) and
tests/engine/kernels/test_triton_interpret.py (the Triton prefill kernel run by Triton's
interpreter on the CPU). Every step draws fresh random inputs, scatters each sequence over shuffled
cache blocks, fills the output with NaN before the call (so an unwritten element fails), and
compares with the reference computed in float32 from the same low-precision inputs. Kernel modules
are imported inside the functions: under the interpreter TRITON_INTERPRET=1 must be set before they
are first imported.
"""

from __future__ import annotations

import torch

from engine.input_metadata import InputMetadata
from engine.kernels.reference import paged_attention_reference

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}
FEATURES = {
    "plain": {},
    "alibi": {"alibi": True},
    "window": {"sliding_window": 300},
    "soft_cap": {"logits_soft_cap": 4.0},
    "all": {"alibi": True, "sliding_window": 20, "logits_soft_cap": 2.5},
    "sinks": {"sinks": True},
    "sinks_window": {"sinks": True, "sliding_window": 20},
}
# (query_lens, context_lens): whole prompts, chunked prefill and prefix-cache hits (new tokens after
# cached context), and decode tokens, all in one step.
MIXED_STEP = ([70, 1, 33, 5, 1, 128], [70, 17, 100, 4096, 1000, 300])


def make_step(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    seed: int = 0,
    *,
    device: str,
):
    """Random query, caches and metadata; each sequence's blocks are scattered over the cache."""
    generator = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 5  # spare blocks that no sequence owns
    order = torch.randperm(num_blocks, generator=generator, device=device).tolist()
    tables, used = [], 0
    for count in blocks_per_seq:
        tables.append(order[used : used + count] or [0])
        used += count
    metadata = InputMetadata.build(query_lens, context_lens, tables, block_size, device=device)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator, device=device).to(dtype)
    value_cache = torch.randn(shape, generator=generator, device=device).to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator, device=device).to(dtype)
    return query, key_cache, value_cache, metadata


def feature_args(features: dict, num_heads: int, *, device: str) -> dict:
    slopes = None
    if features.get("alibi"):
        slopes = torch.rand(num_heads, device=device) * 0.5
    args = {
        "alibi_slopes": slopes,
        "sliding_window": features.get("sliding_window"),
        "logits_soft_cap": features.get("logits_soft_cap"),
    }
    if features.get("sinks"):  # large enough that some heads give the sink most of their weight
        args["sinks"] = torch.randn(num_heads, device=device) * 3.0
    return args


def reference(query, key_cache, value_cache, metadata, scale, args) -> torch.Tensor:
    return paged_attention_reference(
        query.float(), key_cache.float(), value_cache.float(), metadata, scale, **args
    )


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "output has unwritten (NaN) elements"
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def run_prefill(query, key_cache, value_cache, metadata, scale, args) -> torch.Tensor:
    from engine.kernels import triton_attention

    out = torch.full_like(query, float("nan"))
    triton_attention.paged_prefill_attention(
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.context_lens,
        metadata.query_start_loc,
        metadata.max_query_len,
        scale,
        out=out,
        **args,
    )
    return out


def check_prefill(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    feature: str = "plain",
    block_size: int = 16,
    scale: float = 0.2,
    seed: int = 0,
) -> None:
    """The Triton prefill/mixed-step kernel against the reference on one random step."""
    query, key_cache, value_cache, metadata = make_step(
        query_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype, block_size, seed, device=device
    )
    args = feature_args(FEATURES[feature], num_heads, device=device)
    expected = reference(query, key_cache, value_cache, metadata, scale, args)
    assert_matches(run_prefill(query, key_cache, value_cache, metadata, scale, args), expected, dtype)
