"""CUDA and Triton attention kernels against the PyTorch reference (`engine/kernels/reference.py`).

Inputs and checks come from tests/engine/kernels/attention_cases.py (random steps scattered over
shuffled cache blocks, NaN-poisoned outputs, a float32 reference). Skipped without a CUDA device.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from engine.input_metadata import InputMetadata
from engine.kernels.reference import write_kv_cache_reference
from tests.engine.kernels import attention_cases
from tests.engine.kernels.attention_cases import (
    FEATURES,
    MIXED_STEP,
    assert_matches,
    check_prefill,
    reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

make_step = functools.partial(attention_cases.make_step, device="cuda")
feature_args = functools.partial(attention_cases.feature_args, device="cuda")


def decode_over_poison(query, key_cache, value_cache, metadata, scale, **kwargs):
    """The CUDA decode kernel's output, written over NaNs (a row it skips stays NaN). `kwargs`:
    `max_context_len` and `context_lens` (the metadata's by default), `partition_size`, features."""
    from engine.kernels import cuda_ops

    context_lens = kwargs.pop("context_lens", metadata.context_lens)
    max_context_len = kwargs.pop("max_context_len", metadata.max_context_len)
    out = torch.full_like(query, float("nan"))
    cuda_ops.paged_decode_attention(
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        context_lens,
        max_context_len,
        scale,
        out=out,
        **kwargs,
    )
    return out


# --- KV cache write ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [128, 36])  # 36 fp16/bf16 rows are not whole 16-byte packs
def test_write_kv_cache_matches_reference(dtype, head_dim):
    from engine.kernels import cuda_ops

    num_tokens, num_kv_heads, block_size, num_blocks = 37, 4, 16, 9
    # k and v as strided views into one fused projection output, as the attention layer sees them.
    fused = torch.randn(num_tokens, 3 * num_kv_heads * head_dim + 4, device="cuda").to(dtype)
    width = num_kv_heads * head_dim
    key = fused[:, width : 2 * width].view(num_tokens, num_kv_heads, head_dim)
    value = fused[:, 2 * width + 4 :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::5] = -1  # padding tokens are skipped
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device="cuda").to(dtype)
    value_cache = torch.randn(shape, device="cuda").to(dtype)
    expected_key, expected_value = key_cache.clone(), value_cache.clone()
    write_kv_cache_reference(key, value, expected_key, expected_value, slots)
    cuda_ops.write_kv_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_key)
    assert torch.equal(value_cache, expected_value)


def test_write_kv_cache_rejects_mismatched_shapes():
    from engine.kernels import cuda_ops

    cache = torch.zeros(4, 16, 2, 64, device="cuda", dtype=torch.float16)
    key = torch.zeros(3, 2, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="key/value must be"):
        cuda_ops.write_kv_cache(
            key, key, cache, cache.clone(), torch.zeros(3, dtype=torch.long, device="cuda")
        )


# --- CUDA decode attention -----------------------------------------------------------------------

DECODE_CONTEXTS = [1, 16, 17, 32, 1000, 4096]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_decode_matches_reference(dtype, head_dim, group, feature):
    num_kv_heads = 2
    num_heads = num_kv_heads * group
    query, key_cache, value_cache, metadata = make_step(
        [1] * len(DECODE_CONTEXTS), DECODE_CONTEXTS, num_heads, num_kv_heads, head_dim, dtype, seed=group
    )
    args = feature_args(FEATURES[feature], num_heads)
    scale = head_dim**-0.5
    expected = reference(query, key_cache, value_cache, metadata, scale, args)
    for partition_size in (None, 128, 512):  # heuristic, many partitions, few (and single) partitions
        out = decode_over_poison(
            query, key_cache, value_cache, metadata, scale, partition_size=partition_size, **args
        )
        assert_matches(out, expected, dtype)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "num_heads", "num_kv_heads", "block_size"),
    [
        (torch.float32, 128, 8, 2, 16),
        (torch.float32, 64, 16, 2, 16),  # fp32 runs on CUDA cores at every group size
        (torch.float16, 256, 4, 1, 16),
        (torch.float16, 256, 2, 2, 16),
        (torch.bfloat16, 128, 12, 4, 32),  # group of 3: a head chunk with an unused slot
        (torch.float16, 64, 48, 1, 8),  # MQA, 48 heads: six chunks of eight
        (torch.bfloat16, 128, 6, 6, 1),
        (torch.bfloat16, 64, 12, 4, 16),  # group of 3 at head_dim 64: a warp's merge lanes span heads 2 and 3
        (torch.float32, 64, 4, 4, 16),  # MHA in fp32: one head per CUDA-core block
    ],
)
def test_decode_other_shapes(dtype, head_dim, num_heads, num_kv_heads, block_size):
    contexts = [3, 64, 513, 2000]
    query, key_cache, value_cache, metadata = make_step(
        [1] * len(contexts), contexts, num_heads, num_kv_heads, head_dim, dtype, block_size
    )
    # "all" has a 20-token window, so only "plain" and "sinks" reach the split-K merge.
    for feature, partition_size in itertools.product(("plain", "all", "sinks"), (None, 64)):
        args = feature_args(FEATURES[feature], num_heads)
        expected = reference(query, key_cache, value_cache, metadata, 0.1, args)
        out = decode_over_poison(
            query,
            key_cache,
            value_cache,
            metadata,
            0.1,
            max_context_len=2000,
            partition_size=partition_size,
            **args,
        )
        assert_matches(out, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "group"), [(64, 1), (64, 4), (128, 1), (128, 8), (256, 4)])
def test_decode_large_grid(dtype, head_dim, group):
    """More (sequence, KV head) pairs than any GPU has multiprocessors: the launcher takes 4-warp
    tensor-core blocks (and the CUDA-core kernel for MHA) instead of the 8-warp ones the small tests
    reach; split-K forced on them too."""
    generator = torch.Generator().manual_seed(head_dim + group)
    contexts = [int(c) for c in torch.randint(1, 700, (120,), generator=generator)]
    num_kv_heads = 3
    num_heads = num_kv_heads * group
    query, key_cache, value_cache, metadata = make_step(
        [1] * len(contexts), contexts, num_heads, num_kv_heads, head_dim, dtype, seed=group
    )
    for feature, partition_size in itertools.product(("plain", "sinks"), (None, 64, 256)):
        args = feature_args(FEATURES[feature], num_heads)
        expected = reference(query, key_cache, value_cache, metadata, 0.1, args)
        out = decode_over_poison(
            query, key_cache, value_cache, metadata, 0.1, partition_size=partition_size, **args
        )
        assert_matches(out, expected, dtype)


def test_decode_single_partition_big_batch_and_strided_query():
    from engine.kernels import cuda_ops

    contexts = [int(c) for c in torch.randint(1, 300, (96,))]
    num_heads, num_kv_heads, head_dim = 8, 2, 128
    query, key_cache, value_cache, metadata = make_step(
        [1] * len(contexts), contexts, num_heads, num_kv_heads, head_dim, torch.float16
    )
    # The query as a view into a fused qkv output: token stride larger than num_heads * head_dim.
    fused = torch.randn(len(contexts), num_heads * head_dim * 2, device="cuda", dtype=torch.float16)
    fused[:, : num_heads * head_dim] = query.reshape(len(contexts), -1)
    strided_query = fused[:, : num_heads * head_dim].view(len(contexts), num_heads, head_dim)
    expected = reference(query, key_cache, value_cache, metadata, 0.125, feature_args({}, num_heads))
    out = cuda_ops.paged_decode_attention(
        strided_query, key_cache, value_cache, metadata.block_tables, metadata.context_lens, 300, 0.125
    )
    assert_matches(out, expected, torch.float16)


def test_decode_empty_sequence_gets_zeros():
    query, key_cache, value_cache, metadata = make_step([1, 1], [40, 700], 4, 2, 64, torch.float16)
    context_lens = metadata.context_lens.clone()
    context_lens[0] = 0  # a padded slot of a captured batch
    for partition_size in (512, 128):
        out = decode_over_poison(
            query,
            key_cache,
            value_cache,
            metadata,
            0.1,
            context_lens=context_lens,
            max_context_len=700,
            partition_size=partition_size,
        )
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert not out[1].isnan().any()


def test_decode_split_k_merge_replays_in_a_cuda_graph():
    """The tensor-core kernel merges split-K partitions in its last block, counting arrivals in a
    buffer that must be back at zero after every launch: replays with new lengths and new data must
    each match the reference, and so must an eager call after them."""
    from engine.kernels import cuda_ops

    contexts = [4096, 700, 1, 2048]
    query, key_cache, value_cache, metadata = make_step(
        [1] * len(contexts), contexts, 32, 4, 128, torch.bfloat16, seed=3
    )
    context_lens = metadata.context_lens.clone()
    out = torch.empty_like(query)

    def run():
        cuda_ops.paged_decode_attention(
            query,
            key_cache,
            value_cache,
            metadata.block_tables,
            context_lens,
            4096,
            0.09,
            out=out,
            partition_size=256,
        )

    run()  # eager first, as the engine does before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    args = feature_args({}, 32)
    for lengths in ([4096, 700, 1, 2048], [300, 4000, 17, 0], [16, 1, 4096, 1000]):
        context_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        query.normal_()
        out.fill_(float("nan"))
        graph.replay()
        # Past its own blocks a sequence's padded table row points at block 0: fine for a kernel test.
        step = InputMetadata.from_arrays(
            np.ones(4), np.maximum(lengths, 1), metadata.block_tables.cpu().numpy(), 16, device="cuda"
        )
        expected = reference(query, key_cache, value_cache, step, 0.09, args)
        for row, n in enumerate(lengths):
            if n == 0:
                assert torch.equal(out[row], torch.zeros_like(out[row]))
            else:
                assert_matches(out[row : row + 1], expected[row : row + 1], torch.bfloat16)
    out.fill_(float("nan"))
    run()
    assert not out.isnan().any()


def test_decode_understated_max_context_len_leaves_later_calls_correct():
    """A `max_context_len` below a real context is a caller's bug: that call may be wrong, but the
    in-kernel split-K merge must not be left waiting for partitions that were never launched."""
    from engine.kernels import cuda_ops

    query, key_cache, value_cache, metadata = make_step([1, 1], [3000, 50], 16, 4, 128, torch.bfloat16)
    common = (query, key_cache, value_cache, metadata.block_tables, metadata.context_lens)
    cuda_ops.paged_decode_attention(*common, 1000, 0.1, partition_size=256)
    expected = reference(query, key_cache, value_cache, metadata, 0.1, feature_args({}, 16))
    out = cuda_ops.paged_decode_attention(*common, 3000, 0.1, partition_size=256)
    assert_matches(out, expected, torch.bfloat16)


# --- Triton prefill / mixed attention ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_mixed_step_matches_reference(dtype, head_dim, group):
    check_prefill(*MIXED_STEP, 2 * group, 2, head_dim, dtype, "cuda", scale=head_dim**-0.5, seed=group)


@pytest.mark.parametrize("feature", ["alibi", "window", "soft_cap", "all"])
def test_prefill_features_match_reference(feature):
    check_prefill(*MIXED_STEP, 8, 2, 128, torch.bfloat16, "cuda", feature, scale=0.09)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "query_lens", "context_lens", "block_size"),
    [
        (torch.float32, 64, [40, 3], [40, 90], 16),
        (torch.float16, 80, [17, 1], [50, 33], 16),  # head_dim padded to 128 inside the kernel
        (torch.float16, 128, [1, 1, 1, 1], [1, 16, 17, 4096], 16),  # decode-only through Triton
        (torch.bfloat16, 64, [200, 9], [200, 300], 12),  # block size that is not a power of two
    ],
)
def test_prefill_other_shapes(dtype, head_dim, query_lens, context_lens, block_size):
    check_prefill(query_lens, context_lens, 4, 2, head_dim, dtype, "cuda", "all", block_size)


# --- dispatch: the layer-facing entry points -----------------------------------------------------


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [9, 1, 30]])
def test_dispatch_write_then_attend_matches_reference(query_lens, monkeypatch):
    from engine.kernels import dispatch

    context_lens = [50, 20, 30]
    query, key_cache, value_cache, metadata = make_step(query_lens, context_lens, 8, 2, 128, torch.bfloat16)
    new_key = torch.randn(sum(query_lens), 2, 128, device="cuda").to(torch.bfloat16)
    new_value = torch.randn_like(new_key)
    caches = (key_cache.clone(), value_cache.clone())
    dispatch.write_kv_cache(new_key, new_value, *caches, metadata.slot_mapping)
    out = dispatch.paged_attention(query, *caches, metadata, 0.1, None, 16, 3.0)

    monkeypatch.setenv("PORTER_FORCE_REFERENCE", "1")
    reference_caches = (key_cache.clone(), value_cache.clone())
    dispatch.write_kv_cache(new_key, new_value, *reference_caches, metadata.slot_mapping)
    expected = dispatch.paged_attention(
        query.float(), *(c.float() for c in reference_caches), metadata, 0.1, None, 16, 3.0
    )
    assert torch.equal(caches[0], reference_caches[0]) and torch.equal(caches[1], reference_caches[1])
    assert_matches(out, expected, torch.bfloat16)
