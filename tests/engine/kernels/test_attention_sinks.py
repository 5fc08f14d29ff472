"""Attention sinks: a per-head logit in the softmax denominator, in the reference (against the
formula written out), the PagedAttention layer under tensor parallelism, and the Triton
prefill/mixed kernel under Triton's interpreter (tests/engine/kernels/attention_cases.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.input_metadata import InputMetadata
from engine.kernels.reference import paged_attention_reference
from engine.layers.attention import PagedAttention
from tests.engine.kernels.attention_cases import make_step
from tests.engine.layers._tp import simulated_rank


def test_reference_sinks_match_the_formula():
    query, key_cache, value_cache, metadata = make_step([5, 1], [9, 20], 4, 2, 8, torch.float32, device="cpu")
    sinks = torch.tensor([0.0, 3.0, -2.0, 10.0])
    got = paged_attention_reference(
        query, key_cache, value_cache, metadata, 0.3, sliding_window=6, sinks=sinks
    )
    start = 0
    for seq, (query_len, context_len) in enumerate(zip(metadata.query_lens_host, metadata.context_lens_host)):
        slots = [int(metadata.block_tables[seq][i // 16]) * 16 + i % 16 for i in range(context_len)]
        keys = key_cache.flatten(0, 1)[slots]
        values = value_cache.flatten(0, 1)[slots]
        for j in range(query_len):
            position = context_len - query_len + j
            for head in range(4):
                visible = [k for k in range(context_len) if 0 <= position - k < 6]
                logits = torch.stack([0.3 * query[start + j, head] @ keys[k, head // 2] for k in visible])
                weights = torch.exp(logits) / (torch.exp(logits).sum() + torch.exp(sinks[head]))
                want = (weights[:, None] * values[visible, head // 2]).sum(0)
                torch.testing.assert_close(got[start + j, head], want, rtol=1e-5, atol=1e-5)
        start += query_len


def test_a_large_sink_takes_the_weight_from_every_key():
    query, key_cache, value_cache, metadata = make_step([3], [3], 2, 2, 8, torch.float32, device="cpu")
    out = paged_attention_reference(
        query, key_cache, value_cache, metadata, 0.1, sinks=torch.tensor([80.0, 80.0])
    )
    assert out.abs().max() < 1e-20


def test_paged_attention_takes_each_ranks_heads_of_the_sinks():
    torch.manual_seed(0)
    sinks = torch.nn.Parameter(torch.randn(4) * 2, requires_grad=False)
    metadata = InputMetadata.build([3], [3], [[0]], 16)
    query, key, value = torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    whole = PagedAttention(4, 8, 0.3, sinks=sinks)
    expected = whole(query, key, value, (torch.zeros(1, 16, 4, 8), torch.zeros(1, 16, 4, 8)), metadata)
    assert [name for name, _ in whole.named_parameters()] == ["sinks"]
    for rank in range(2):
        with simulated_rank(rank, 2):
            layer = PagedAttention(4, 8, 0.3, sinks=sinks)
        heads = slice(2 * rank, 2 * rank + 2)
        caches = (torch.zeros(1, 16, 2, 8), torch.zeros(1, 16, 2, 8))
        got = layer(query[:, heads], key[:, heads], value[:, heads], caches, metadata)
        torch.testing.assert_close(got, expected[:, heads])
    with pytest.raises(ValueError, match=r"sinks must hold one logit per head of all ranks \(4\)"):
        PagedAttention(4, 8, 0.3, sinks=torch.zeros(2))


SINK_CASES = """
step = ([40, 1, 20, 5, 1], [40, 17, 70, 600, 300])  # prompt, decode, chunk after cached context
for dtype in (torch.float32, torch.float16):
    for feature in ("sinks", "sinks_window"):
        check_prefill(*step, 4, 2, 64, dtype, "cpu", feature)
check_prefill([1, 1, 1], [1, 16, 300], 8, 2, 64, torch.float32, "cpu", "sinks_window")  # decode rows
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_prefill_kernel_with_sinks_under_interpreter():
    from tests.engine.kernels.test_triton_interpret import run_interpreted

    run_interpreted(SINK_CASES)
