"""`local_heads` / `shard_heads`: a module with a weight per head holds and loads its rank's heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers import local_heads, shard_heads
from engine.weights import load_named_weights
from tests.engine.layers._tp import simulated_rank


class PerHeadScale(nn.Module):
    """A weight per head ([heads, head_dim]) and a bias shared by every head ([head_dim])."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(head_dim))


def _load(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    load_named_weights(module, weights.items())


@pytest.mark.parametrize(
    ("heads", "kv", "world", "expected_rows"),
    [
        (4, False, 1, [[0, 1, 2, 3]]),
        (4, False, 2, [[0, 1], [2, 3]]),
        (4, True, 2, [[0, 1], [2, 3]]),
        (1, True, 2, [[0], [0]]),  # fewer KV heads than ranks: each rank holds the replicated one
        (2, True, 4, [[0], [0], [1], [1]]),
    ],
)
def test_each_rank_loads_its_heads_rows(heads, kv, world, expected_rows):
    full_weight = torch.arange(heads * 3, dtype=torch.float32).view(heads, 3)
    full_bias = torch.tensor([7.0, 8.0, 9.0])
    for rank in range(world):
        with simulated_rank(rank, world):
            module = shard_heads(PerHeadScale(local_heads(heads, kv=kv), 3), heads, kv=kv)
            _load(module, {"weight": full_weight, "bias": full_bias})
        torch.testing.assert_close(module.weight.data, full_weight[expected_rows[rank]])
        torch.testing.assert_close(module.bias.data, full_bias)  # not per head: loaded whole


def test_a_checkpoint_without_every_head_is_refused():
    with simulated_rank(0, 2):
        module = shard_heads(PerHeadScale(local_heads(4), 3), 4)
    with pytest.raises(
        ValueError, match=r"PerHeadScale.weight \(per-head\): expected checkpoint shape \(4, 3\)"
    ):
        _load(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(3)})


def test_query_heads_must_divide_among_the_ranks():
    with simulated_rank(0, 2), pytest.raises(ValueError, match="number of attention heads"):
        local_heads(3)
