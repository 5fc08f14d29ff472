"""Attention sinks on CUDA: the Triton prefill/mixed kernel against the reference, a decode-only
step through the dispatcher (the CUDA decode kernel), and sinks far above or below every score.
The CUDA decode kernel's sink term at every shape and split is in tests/gpu/test_kernels.py.
Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import dispatch
from tests.engine.kernels.attention_cases import (
    MIXED_STEP,
    assert_matches,
    check_prefill,
    feature_args,
    make_step,
    reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("feature", ["sinks", "sinks_window"])
def test_prefill_kernel_with_sinks(dtype, feature):
    check_prefill(*MIXED_STEP, 64, 8, 64, dtype, "cuda", feature)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_step_with_sinks_through_dispatch(dtype):
    query, key_cache, value_cache, metadata = make_step(
        [1] * 6, [1, 17, 300, 1000, 4096, 33], 64, 8, 128, dtype, device="cuda"
    )
    args = feature_args({"sinks": True, "sliding_window": 128}, 64, device="cuda")
    expected = reference(query, key_cache, value_cache, metadata, 0.1, args)
    got = dispatch.paged_attention(query, key_cache, value_cache, metadata, 0.1, **args)
    assert_matches(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sink", [60.0, -60.0])
@pytest.mark.parametrize("partition_size", [None, 64])
def test_decode_kernel_with_extreme_sinks(dtype, sink, partition_size):
    """A sink that takes every head's whole weight (exp overflows past any score: the output is
    zero, not NaN) and one that takes none (plain attention), in one partition and split-K."""
    from engine.kernels import cuda_ops

    query, key_cache, value_cache, metadata = make_step(
        [1] * 4, [1, 40, 700, 2000], 8, 2, 64, dtype, device="cuda"
    )
    sinks = torch.full((8,), sink, device="cuda")
    expected = reference(query, key_cache, value_cache, metadata, 0.1, {"sinks": sinks})
    got = cuda_ops.paged_decode_attention(
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.context_lens,
        metadata.max_context_len,
        0.1,
        partition_size=partition_size,
        sinks=sinks,
    )
    assert_matches(got, expected, dtype)
