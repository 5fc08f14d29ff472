"""Attention sinks on CUDA: the Triton prefill/mixed kernel against the reference, and a decode-only
step through the dispatcher (heads with sinks take the Triton kernel, not the CUDA decode kernel).
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
