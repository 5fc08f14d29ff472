"""The layers on two real gloo ranks: collectives included, each rank's result against dense torch.

One spawn runs every check (spawning costs seconds). Checkpoint tensors are drawn from the same seed
on both ranks, so each rank loads its slice of the same full weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine import distributed
from engine.input_metadata import InputMetadata
from engine.kernels import dispatch
from engine.layers import (
    ColumnParallelLinear,
    FeatureShardedRMSNorm,
    HeadShardedRMSNorm,
    LogitsProcessor,
    MergedColumnParallelLinear,
    PagedAttention,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    alibi_slopes,
)
from tests.engine.layers._tp import fused_qkv, run_on_ranks

TP = 2
HEAD_DIM = 8
ATTENTION_SEQUENCES = [(37, 37), (50, 18), (33, 1), (16, 1)]  # (context after the step, new tokens)
ATTENTION_CASES = {  # name: (heads, kv_heads, extra PagedAttention kwargs)
    "gqa_sliding_window": (8, 2, {"sliding_window": 9}),
    "mqa_alibi_replicated": (4, 1, {"alibi_slopes": alibi_slopes(4)}),
    "gqa_soft_cap": (4, 2, {"logits_soft_cap": 3.0}),
}


def assert_near(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """allclose with the float32 defaults of torch.testing (whose first call in a fresh rank imports
    DTensor, seconds of startup)."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, rtol=1.3e-6, atol=1e-5), f"{msg}: max difference {difference}"


def load(layer, weight, bias=None, shard_id=None):
    layer.weight.weight_loader(layer.weight, weight, shard_id)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias, shard_id)


def attention_on_heads(layer, heads, kv_heads, query_heads=slice(None), kv_heads_held=slice(None)):
    """Writes each chunked sequence's earlier context, then runs one mixed step on the heads held.

    The full q/k/v come from a fixed seed, so every caller (tp=1, each tp rank) sees the same batch.
    """
    generator = torch.Generator().manual_seed(1)
    sizes = [math.ceil(context / 16) for context, _ in ATTENTION_SEQUENCES]
    order = torch.randperm(sum(sizes) + 3, generator=generator).tolist()
    tables = [order[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
    full = [
        (
            torch.randn(context, heads, HEAD_DIM, generator=generator)[:, query_heads],
            torch.randn(context, kv_heads, HEAD_DIM, generator=generator)[:, kv_heads_held],
            torch.randn(context, kv_heads, HEAD_DIM, generator=generator)[:, kv_heads_held],
        )
        for context, _ in ATTENTION_SEQUENCES
    ]
    local_kv = full[0][1].shape[1]
    shape = (sum(sizes) + 3, 16, local_kv, HEAD_DIM)
    cache = (torch.full(shape, float("nan")), torch.full(shape, float("nan")))
    earlier = [i for i, (context, new) in enumerate(ATTENTION_SEQUENCES) if context > new]
    prefix = InputMetadata.build(
        [ATTENTION_SEQUENCES[i][0] - ATTENTION_SEQUENCES[i][1] for i in earlier],
        [ATTENTION_SEQUENCES[i][0] - ATTENTION_SEQUENCES[i][1] for i in earlier],
        [tables[i] for i in earlier],
        16,
    )
    prefix_kv = [
        torch.cat([full[i][j][: prefix.context_lens_host[n]] for n, i in enumerate(earlier)]) for j in (1, 2)
    ]
    dispatch.write_kv_cache(*prefix_kv, *cache, prefix.slot_mapping)
    step = InputMetadata.build(
        [new for _, new in ATTENTION_SEQUENCES], [context for context, _ in ATTENTION_SEQUENCES], tables, 16
    )
    q, k, v = (torch.cat([f[j][c - n :] for f, (c, n) in zip(full, ATTENTION_SEQUENCES)]) for j in range(3))
    return layer(q, k, v, cache, step).reshape(q.shape)


def check_column_row_pairs() -> None:
    rank = distributed.get_tp_rank()
    torch.manual_seed(0)
    hidden, intermediate = 16, 32
    x = torch.randn(5, hidden)
    # Llama-style: fused gate|up (column), SiLU gate, down (row) with a bias that must be added once.
    gate, up, down, down_bias = (
        torch.randn(intermediate, hidden),
        torch.randn(intermediate, hidden),
        torch.randn(hidden, intermediate),
        torch.randn(hidden),
    )
    gate_up = MergedColumnParallelLinear(hidden, [intermediate, intermediate], bias=False)
    load(gate_up, torch.cat([gate, up]))
    down_proj = RowParallelLinear(intermediate, hidden)
    load(down_proj, down, down_bias)
    expected = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down, down_bias)
    assert_near(down_proj(SiluAndMul()(gate_up(x))), expected, msg=f"gated MLP, rank {rank}")
    # GPT-2-style: Conv1D checkpoints ([in, out]), biases on both, GELU between.
    fc, fc_bias, proj, proj_bias = (
        torch.randn(hidden, 4 * hidden),
        torch.randn(4 * hidden),
        torch.randn(4 * hidden, hidden),
        torch.randn(hidden),
    )
    c_fc = ColumnParallelLinear(hidden, 4 * hidden, checkpoint_transposed=True)
    c_proj = RowParallelLinear(4 * hidden, hidden, checkpoint_transposed=True)
    load(c_fc, fc, fc_bias)
    load(c_proj, proj, proj_bias)
    expected = F.gelu(x @ fc + fc_bias) @ proj + proj_bias
    assert_near(c_proj(F.gelu(c_fc(x))), expected, msg=f"Conv1D MLP, rank {rank}")
    gathered = ColumnParallelLinear(hidden, 24, gather_output=True)
    load(gathered, fc.t()[:24].contiguous(), fc_bias[:24])
    assert_near(gathered(x), F.linear(x, fc.t()[:24], fc_bias[:24]), msg="gather_output")


def check_qkv_layouts() -> None:
    rank = distributed.get_tp_rank()
    torch.manual_seed(1)
    hidden = 16
    x = torch.randn(3, hidden)
    for heads, kv_heads, layout in ((4, 1, "concatenated"), (4, 1, "grouped"), (4, 4, "per_head")):
        q, k, v = (torch.randn(n * HEAD_DIM, hidden) for n in (heads, kv_heads, kv_heads))
        biases = [torch.randn(n * HEAD_DIM) for n in (heads, kv_heads, kv_heads)]
        layer = QKVParallelLinear(hidden, HEAD_DIM, heads, kv_heads, checkpoint_layout=layout)
        load(
            layer,
            fused_qkv(layout, q, k, v, heads, kv_heads, HEAD_DIM),
            fused_qkv(layout, *biases, heads, kv_heads, HEAD_DIM),
        )
        q_out, k_out, v_out = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        q_rows = slice(rank * layer.q_size, (rank + 1) * layer.q_size)
        kv_rows = (
            slice(0, HEAD_DIM) if kv_heads == 1 else slice(rank * layer.kv_size, (rank + 1) * layer.kv_size)
        )
        assert layer.num_kv_heads == (1 if kv_heads == 1 else kv_heads // TP)
        what = f"{layout} H={heads} KV={kv_heads} rank {rank}"
        assert_near(q_out, F.linear(x, q[q_rows], biases[0][q_rows]), msg=what)
        assert_near(k_out, F.linear(x, k[kv_rows], biases[1][kv_rows]), msg=what)
        assert_near(v_out, F.linear(x, v[kv_rows], biases[2][kv_rows]), msg=what)


def check_vocab_and_logits() -> None:
    torch.manual_seed(2)
    vocab, dim = 49953, 8
    weight = torch.randn(vocab, dim)
    embedding = VocabParallelEmbedding(vocab, dim)
    load(embedding, weight)
    ids = torch.tensor([0, 25023, 25024, vocab - 1, 123, 40000])
    assert_near(embedding(ids), F.embedding(ids, weight))
    head = ParallelLMHead(vocab, dim)
    head.tie_to(embedding)
    metadata = InputMetadata.build([2, 1, 3], [2, 7, 3], [[0], [1], [2]], 16)
    hidden = torch.randn(6, dim)
    logits = LogitsProcessor(vocab, scale=0.5, soft_cap=20.0)(head, hidden, metadata)
    expected = 20.0 * torch.tanh(F.linear(hidden[[1, 2, 5]], weight) * 0.5 / 20.0)
    assert logits.shape == (3, vocab) and logits.dtype == torch.float32
    assert_near(logits, expected)


def check_head_sharded_norms() -> None:
    """A norm over all heads at once, each rank holding some: query heads split, and one KV head
    replicated on both ranks (its sum of squares must not count twice)."""
    rank = distributed.get_tp_rank()
    torch.manual_seed(3)
    for heads, kv in ((4, False), (2, True), (1, True)):
        full = heads * HEAD_DIM
        weight = torch.randn(full)
        x = torch.randn(5, full)
        expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        norm = HeadShardedRMSNorm(heads, HEAD_DIM, eps=1e-6, kv=kv)
        load(norm, weight)
        if heads >= TP:
            held = slice(rank * full // TP, (rank + 1) * full // TP)
        else:
            held = slice(0, full)  # the one KV head, replicated
        assert_near(norm(x[:, held]), expected[:, held], msg=f"heads={heads} kv={kv} rank {rank}")
    # a column-parallel activation (BitNet's sub-norm before its down projection): features split
    width = 6 * TP
    weight, x = torch.randn(width), torch.randn(5, width)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    norm = FeatureShardedRMSNorm(width, eps=1e-6)
    load(norm, weight)
    held = slice(rank * width // TP, (rank + 1) * width // TP)
    assert_near(norm(x[:, held]), expected[:, held], msg=f"feature-sharded, rank {rank}")


def check_paged_attention(tp1_outputs: dict) -> None:
    rank = distributed.get_tp_rank()
    for name, (heads, kv_heads, kwargs) in ATTENTION_CASES.items():
        layer = PagedAttention(heads, HEAD_DIM, 0.3, num_kv_heads=kv_heads, **kwargs)
        query_heads = slice(rank * heads // TP, (rank + 1) * heads // TP)
        held = slice(0, 1) if kv_heads < TP else slice(rank * kv_heads // TP, (rank + 1) * kv_heads // TP)
        out = attention_on_heads(layer, heads, kv_heads, query_heads, held)
        assert_near(out, tp1_outputs[name][:, query_heads], msg=f"{name}, rank {rank}")


def tensor_parallel_checks(tp1_outputs: dict) -> None:
    assert distributed.get_tp_size() == TP
    check_column_row_pairs()
    check_qkv_layouts()
    check_vocab_and_logits()
    check_head_sharded_norms()
    check_paged_attention(tp1_outputs)


@pytest.mark.slow
def test_layers_on_two_gloo_ranks_match_dense_and_tp1():
    tp1_outputs = {}
    for name, (heads, kv_heads, kwargs) in ATTENTION_CASES.items():
        layer = PagedAttention(heads, HEAD_DIM, 0.3, num_kv_heads=kv_heads, **kwargs)
        tp1_outputs[name] = attention_on_heads(layer, heads, kv_heads)
    run_on_ranks(tensor_parallel_checks, TP, tp1_outputs)
