"""Linear layers against dense torch: each rank's shard (built as rank r of tp) and the sum/concat of all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tests.engine.layers._tp import fused_qkv, simulated_rank

IN, OUT = 24, 32


def load(layer, weight, bias=None, shard_id=None):
    layer.weight.weight_loader(layer.weight, weight, shard_id)
    if bias is not None:
        layer.bias.weight_loader(layer.bias, bias, shard_id)


@pytest.mark.parametrize("transposed", [False, True])
def test_replicated_linear_matches_dense(transposed):
    weight, bias, x = torch.randn(OUT, IN), torch.randn(OUT), torch.randn(5, IN)
    layer = ReplicatedLinear(IN, OUT, checkpoint_transposed=transposed)
    load(layer, weight.t().contiguous() if transposed else weight, bias)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("transposed", [False, True])
def test_column_parallel_shards_concatenate_to_dense(tp, transposed):
    weight, bias, x = torch.randn(OUT, IN), torch.randn(OUT), torch.randn(5, IN)
    outputs = []
    for rank in range(tp):
        with simulated_rank(rank, tp):
            layer = ColumnParallelLinear(IN, OUT, checkpoint_transposed=transposed)
        assert tuple(layer.weight.shape) == (OUT // tp, IN)
        load(layer, weight.t().contiguous() if transposed else weight, bias)
        outputs.append(layer(x))
    torch.testing.assert_close(torch.cat(outputs, dim=-1), F.linear(x, weight, bias))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_partials_sum_to_dense_with_bias_once(tp):
    weight, bias, x = torch.randn(OUT, IN), torch.randn(OUT), torch.randn(5, IN)
    partials = []
    for rank in range(tp):
        with simulated_rank(rank, tp):
            layer = RowParallelLinear(IN, OUT, reduce_results=False, checkpoint_transposed=True)
        assert tuple(layer.weight.shape) == (OUT, IN // tp)
        load(layer, weight.t().contiguous(), bias)
        shard = IN // tp
        partials.append(layer(x[:, rank * shard : (rank + 1) * shard]))
    torch.testing.assert_close(sum(partials), F.linear(x, weight, bias))


def test_row_parallel_single_rank_reduces_and_adds_bias():
    weight, bias, x = torch.randn(OUT, IN), torch.randn(OUT), torch.randn(3, IN)
    layer = RowParallelLinear(IN, OUT)
    load(layer, weight, bias)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias))


@pytest.mark.parametrize("fused", [True, False])
def test_merged_column_parallel_holds_each_parts_shard(fused):
    sizes, tp = [16, 48], 2
    parts = [torch.randn(size, IN) for size in sizes]
    biases = [torch.randn(size) for size in sizes]
    x = torch.randn(4, IN)
    for rank in range(tp):
        with simulated_rank(rank, tp):
            layer = MergedColumnParallelLinear(IN, sizes, checkpoint_transposed=True)
        if fused:
            load(layer, torch.cat(parts).t().contiguous(), torch.cat(biases))
        else:
            for index in range(len(sizes)):
                load(layer, parts[index].t().contiguous(), biases[index], shard_id=index)
        expected = [
            F.linear(x, p, b).chunk(tp, dim=-1)[rank] for p, b in zip(parts, biases)
        ]  # rank r holds part0[r] | part1[r]
        torch.testing.assert_close(layer(x), torch.cat(expected, dim=-1))


QKV_CASES = [  # (heads, kv_heads, tp, layout)
    (8, 8, 2, "per_head"),
    (8, 8, 4, "concatenated"),
    (8, 2, 2, "grouped"),
    (8, 2, 4, "concatenated"),
    (8, 2, 8, "grouped"),  # replication: 4 ranks share each KV head
    (8, 1, 2, "concatenated"),  # MQA replicated
    (4, 4, 1, "per_head"),
]


@pytest.mark.parametrize("heads,kv_heads,tp,layout", QKV_CASES)
@pytest.mark.parametrize("by_shard", [False, True])
def test_qkv_rank_holds_its_heads(heads, kv_heads, tp, layout, by_shard):
    dim, hidden = 4, 16
    q, k, v = (
        torch.randn(heads * dim, hidden),
        torch.randn(kv_heads * dim, hidden),
        torch.randn(kv_heads * dim, hidden),
    )
    qb, kb, vb = torch.randn(heads * dim), torch.randn(kv_heads * dim), torch.randn(kv_heads * dim)
    x = torch.randn(3, hidden)
    dense_q, dense_k, dense_v = F.linear(x, q, qb), F.linear(x, k, kb), F.linear(x, v, vb)
    for rank in range(tp):
        with simulated_rank(rank, tp):
            layer = QKVParallelLinear(
                hidden, dim, heads, kv_heads, checkpoint_layout=layout, checkpoint_transposed=True
            )
        if by_shard:
            for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
                load(layer, w.t().contiguous(), b, shard_id=name)
        else:
            weight = fused_qkv(layout, q, k, v, heads, kv_heads, dim)
            load(layer, weight.t().contiguous(), fused_qkv(layout, qb, kb, vb, heads, kv_heads, dim))
        local_heads = heads // tp
        kv_index = (
            [rank * kv_heads // tp]
            if tp > kv_heads
            else range(rank * kv_heads // tp, (rank + 1) * kv_heads // tp)
        )
        kv_cols = [c for h in kv_index for c in range(h * dim, (h + 1) * dim)]
        assert (layer.num_heads, layer.q_size, layer.kv_size) == (
            local_heads,
            local_heads * dim,
            len(kv_cols),
        )
        expected = torch.cat(
            [
                dense_q[:, rank * local_heads * dim : (rank + 1) * local_heads * dim],
                dense_k[:, kv_cols],
                dense_v[:, kv_cols],
            ],
            dim=-1,
        )
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(
    "heads,kv_heads,tp,numbers",
    [(6, 6, 4, ("6", "4")), (6, 3, 2, ("3", "2")), (12, 3, 4, ("4", "3"))],
)
def test_qkv_head_counts_tp_does_not_divide_raise_naming_both(heads, kv_heads, tp, numbers):
    with simulated_rank(0, tp), pytest.raises(ValueError) as error:
        QKVParallelLinear(48, 8, heads, kv_heads)
    assert all(n in str(error.value) for n in numbers)


@pytest.mark.parametrize("heads,kv_heads,tp", [(8, 8, 1), (8, 8, 2), (8, 8, 4), (8, 4, 2)])
def test_qkv_blocked_checkpoint_loads_heads_block_by_block(heads, kv_heads, tp):
    """CodeGen's layout: 4 model-parallel blocks, each [q | v | k] of its share of the heads, head h of
    the model being head h % (heads / 4) of block h // (heads / 4)."""
    blocks, dim, hidden = 4, 4, 16
    q, k, v = (
        torch.randn(heads * dim, hidden),
        torch.randn(kv_heads * dim, hidden),
        torch.randn(kv_heads * dim, hidden),
    )
    per_block = [
        torch.cat([t.chunk(blocks)[b] for t in (q, v, k)]) for b in range(blocks)
    ]  # block b: its q heads, then its v heads, then its k heads
    weight = torch.cat(per_block)
    x = torch.randn(3, hidden)
    for rank in range(tp):
        with simulated_rank(rank, tp):
            layer = QKVParallelLinear(
                hidden, dim, heads, kv_heads, bias=False, checkpoint_blocks=blocks, checkpoint_order="qvk"
            )
        load(layer, weight)
        local, local_kv = heads // tp, kv_heads // tp
        expected = torch.cat(
            [
                F.linear(x, q)[:, rank * local * dim : (rank + 1) * local * dim],
                F.linear(x, k)[:, rank * local_kv * dim : (rank + 1) * local_kv * dim],
                F.linear(x, v)[:, rank * local_kv * dim : (rank + 1) * local_kv * dim],
            ],
            dim=-1,
        )
        torch.testing.assert_close(layer(x), expected)


def test_qkv_blocked_checkpoint_settings_are_checked():
    with pytest.raises(ValueError, match="checkpoint_order"):
        QKVParallelLinear(16, 4, 4, 4, checkpoint_order="qqk")
    with pytest.raises(ValueError, match="'concatenated'"):
        QKVParallelLinear(16, 4, 4, 4, checkpoint_layout="per_head", checkpoint_blocks=2)
    with pytest.raises(ValueError, match="3 checkpoint blocks"):
        QKVParallelLinear(16, 4, 4, 4, checkpoint_blocks=3)


def test_qkv_rejects_per_head_layout_with_gqa_and_unknown_shard():
    with pytest.raises(ValueError, match="per_head"):
        QKVParallelLinear(16, 4, 4, 2, checkpoint_layout="per_head")
    layer = QKVParallelLinear(16, 4, 4, 2)
    with pytest.raises(ValueError, match="shard ids"):
        load(layer, torch.randn(16, 16), shard_id="x")


def test_loader_shape_mismatch_names_expected_and_got():
    layer = ColumnParallelLinear(IN, OUT)
    with pytest.raises(ValueError, match=r"expected .*\(32, 24\).*got .*\(24, 32\)"):
        load(layer, torch.randn(IN, OUT))
    merged = MergedColumnParallelLinear(IN, [8, 8])
    with pytest.raises(ValueError, match="part 1"):
        load(merged, torch.randn(9, IN), shard_id=1)
