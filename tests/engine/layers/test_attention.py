"""PagedAttention over a paged cache against dense causal attention over the whole sequences.

Each batch mixes whole prompts, chunked prefills on top of earlier context (written by a previous
step) and decode tokens, with shuffled block tables and lengths on and off block boundaries. The caches
start as NaN, so reading a slot that was never written shows up in the output.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from engine.input_metadata import InputMetadata
from engine.kernels import dispatch
from engine.kernels.reference import write_kv_cache_reference
from engine.layers import PagedAttention, alibi_slopes

BLOCK_SIZE = 16
HEAD_DIM = 8
# (context_len after the step, new tokens this step): whole prompts (off / on a block boundary),
# chunked prefills over 32 or 33 earlier tokens, decodes that open a block, fill one, or sit deep.
SEQUENCES = [(37, 37), (32, 32), (50, 18), (40, 7), (33, 1), (16, 1), (70, 1)]


def dense_causal_attention(query, key, value, scale, slopes=None, window=None, cap=None):
    """Plain attention over one whole sequence [S, heads, D], float64; ALiBi as BLOOM adds it (slope * k)."""
    seq_len, heads = query.shape[:2]
    key = key.double().repeat_interleave(heads // key.shape[1], dim=1)
    value = value.double().repeat_interleave(heads // value.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), key) * scale
    positions = torch.arange(seq_len)
    if slopes is not None:
        scores = scores + slopes.double()[:, None, None] * positions[None, None, :]
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    visible = positions[None, :] <= positions[:, None]
    if window is not None:
        visible &= positions[:, None] - positions[None, :] < window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), value)


def shuffled_block_tables(generator, block_size=BLOCK_SIZE, spare=5):
    needed = [math.ceil(context / block_size) for context, _ in SEQUENCES]
    order = torch.randperm(sum(needed) + spare, generator=generator).tolist()
    tables, start = [], 0
    for count in needed:
        tables.append(order[start : start + count])
        start += count
    return tables, sum(needed) + spare


def run_two_steps(layer, heads, kv_heads, dtype=torch.float32, query_scale=1.0, seed=0):
    """Step 1 writes the earlier context of the chunked sequences; step 2 is the mixed batch.

    Returns (outputs of both steps keyed by sequence, the full q/k/v of every sequence).
    """
    generator = torch.Generator().manual_seed(seed)
    full = [
        (
            torch.randn(context, heads, HEAD_DIM, generator=generator) * query_scale,
            torch.randn(context, kv_heads, HEAD_DIM, generator=generator),
            torch.randn(context, kv_heads, HEAD_DIM, generator=generator),
        )
        for context, _ in SEQUENCES
    ]
    tables, num_blocks = shuffled_block_tables(generator)
    shape = (num_blocks, BLOCK_SIZE, kv_heads, HEAD_DIM)
    cache = (torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype))
    outputs = {i: [] for i in range(len(SEQUENCES))}

    def step(ranges):  # ranges: {seq: (first new token, context after the step)}
        seqs = sorted(ranges)
        metadata = InputMetadata.build(
            [ranges[i][1] - ranges[i][0] for i in seqs],
            [ranges[i][1] for i in seqs],
            [tables[i] for i in seqs],
            BLOCK_SIZE,
        )
        q, k, v = (torch.cat([full[i][j][slice(*ranges[i])] for i in seqs]).to(dtype) for j in range(3))
        out = layer(q.flatten(1), k.flatten(1), v, cache, metadata)  # mixed [T, H*D] / [T, H, D] inputs
        assert out.shape == (q.shape[0], heads * HEAD_DIM) and out.dtype == dtype
        for i, part in zip(seqs, out.split([ranges[i][1] - ranges[i][0] for i in seqs])):
            outputs[i].append(part.reshape(-1, heads, HEAD_DIM))

    step({i: (0, c - n) for i, (c, n) in enumerate(SEQUENCES) if c > n})
    step({i: (c - n, c) for i, (c, n) in enumerate(SEQUENCES)})
    return {i: torch.cat(parts) for i, parts in outputs.items()}, full


CASES = {  # name: (heads, kv_heads, PagedAttention kwargs beyond heads/scale, query scale)
    "mha": (4, 4, {}, 1.0),
    "gqa": (8, 2, {}, 1.0),
    "mqa": (4, 1, {}, 1.0),
    "alibi": (6, 6, {"alibi_slopes": alibi_slopes(6)}, 1.0),
    "sliding_window": (8, 2, {"sliding_window": 7}, 1.0),
    "sliding_window_wide": (4, 4, {"sliding_window": 20}, 1.0),
    "soft_cap": (4, 2, {"logits_soft_cap": 5.0}, 4.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("scale", [None, 0.37])
def test_paged_attention_matches_dense_causal(name, scale):
    heads, kv_heads, kwargs, query_scale = CASES[name]
    scale = 1 / math.sqrt(HEAD_DIM) if scale is None else scale
    layer = PagedAttention(heads, HEAD_DIM, scale, num_kv_heads=kv_heads, **kwargs)
    outputs, full = run_two_steps(layer, heads, kv_heads, query_scale=query_scale)
    for i, (q, k, v) in enumerate(full):
        expected = dense_causal_attention(
            q,
            k,
            v,
            scale,
            kwargs.get("alibi_slopes"),
            kwargs.get("sliding_window"),
            kwargs.get("logits_soft_cap"),
        )
        torch.testing.assert_close(outputs[i].double(), expected, rtol=1e-5, atol=1e-5, msg=f"sequence {i}")


def test_paged_attention_bf16_cache_keeps_query_dtype():
    layer = PagedAttention(8, HEAD_DIM, 0.3, num_kv_heads=2)
    outputs, full = run_two_steps(layer, 8, 2, dtype=torch.bfloat16)
    for i, (q, k, v) in enumerate(full):
        expected = dense_causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3)
        torch.testing.assert_close(outputs[i].double(), expected, rtol=2e-2, atol=2e-2)


def test_write_kv_cache_skips_padding_slots():
    key_cache, value_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv_cache_reference(key, value, key_cache, value_cache, torch.tensor([5, -1, 6]))
    torch.testing.assert_close(key_cache[1, 1], key[0])
    torch.testing.assert_close(value_cache[1, 2], value[2])
    # Nothing else is written; in particular slot -1 must not wrap around to the cache's last row.
    assert torch.count_nonzero(key_cache) == torch.count_nonzero(value_cache) == 2 * 16


@pytest.mark.parametrize("heads", [1, 4, 6, 8, 12, 16, 30])
def test_alibi_slopes_match_bloom(heads):
    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # [heads, 1, 2] = slope * (0, 1)
    torch.testing.assert_close(alibi_slopes(heads), bloom[:, 0, 1])


def test_paged_attention_argument_errors():
    with pytest.raises(ValueError, match="alibi_slopes"):
        PagedAttention(4, 8, 1.0, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match=r"\(6\).*\(4\)"):
        PagedAttention(6, 8, 1.0, num_kv_heads=4)
    with pytest.raises(ValueError, match="tokens"):
        metadata = InputMetadata.build([2], [2], [[0]], BLOCK_SIZE)
        cache = torch.zeros(1, BLOCK_SIZE, 1, 8)
        dispatch.paged_attention(torch.zeros(3, 1, 8), cache, cache, metadata, 1.0)


def test_force_reference_switch_reads_environment(monkeypatch):
    monkeypatch.setenv("PORTER_FORCE_REFERENCE", "1")
    assert dispatch.reference_forced()
    monkeypatch.setenv("PORTER_FORCE_REFERENCE", "0")
    assert not dispatch.reference_forced()
