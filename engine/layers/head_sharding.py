"""Modules that keep one set of weights per attention head, split by heads like the projections.

Some attention classes normalize q and k head by head with a weight per head: a q/k LayerNorm
holding a `[num_heads, head_dim]` weight. Under tensor parallelism a rank holds only some
of the heads (the ones `QKVParallelLinear` gives it), so such a module is built for
`local_heads(num_heads)` heads and `shard_heads` makes each of its per-head parameters load this
rank's rows of the checkpoint's full tensor. porter writes both calls; at tp=1 they change nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import distributed
from engine.layers.linear import check_full_shape, copy_checked, kv_heads_for_rank


def rank_heads(num_heads: int, kv: bool = False) -> tuple[int, int]:
    """(heads this rank holds, index of its first), as `QKVParallelLinear` splits q (or k/v) heads."""
    tp_size, tp_rank = distributed.get_tp_size(), distributed.get_tp_rank()
    if kv:
        return kv_heads_for_rank(num_heads, tp_size, tp_rank)
    local = distributed.divide(num_heads, tp_size, "number of attention heads")
    return local, tp_rank * local


def local_heads(num_heads: int, kv: bool = False) -> int:
    """How many of `num_heads` query heads (KV heads with `kv=True`) this rank holds."""
    return rank_heads(num_heads, kv)[0]


def shard_heads(module: nn.Module, num_heads: int, kv: bool = False) -> nn.Module:
    """Makes every parameter of `module` whose first dim is this rank's head count load its rows of
    the checkpoint's `[num_heads, ...]` tensor; returns `module`.

    Build the module for `local_heads(num_heads, kv)` heads first. A parameter without the head dim
    first (a scalar, a bias over head_dim) keeps loading whole.
    """
    count, first = rank_heads(num_heads, kv)
    owner = type(module).__name__
    for name, param in module.named_parameters(recurse=False):
        if param.dim() == 0 or param.shape[0] != count:
            continue

        def load(target: torch.Tensor, loaded: torch.Tensor, shard_id=None, _name=name) -> None:
            what = f"{owner}.{_name} (per-head)"
            check_full_shape(loaded, (num_heads, *target.shape[1:]), what)
            copy_checked(target, loaded.narrow(0, first, count), what)

        param.weight_loader = load
    return module
