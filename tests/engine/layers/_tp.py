"""Helpers for the layer tests: tensor-parallel ranks (simulated or spawned) and fused QKV checkpoints.

`simulated_rank` builds a layer as rank r of tp would (to test sharding and weight loading in one
process, with the collectives made the identity so each rank's partial result can be inspected);
`run_on_ranks` runs a function on real gloo ranks in spawned processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import torch
import torch.multiprocessing as mp

from engine import distributed


def _identity(tensor, *args, **kwargs):
    return tensor


@contextmanager
def simulated_rank(rank: int, world_size: int) -> Iterator[None]:
    """Layers built inside see themselves as `rank` of `world_size`; collectives return their input."""
    with (
        mock.patch.object(distributed, "get_tp_rank", return_value=rank),
        mock.patch.object(distributed, "get_tp_size", return_value=world_size),
        mock.patch.object(distributed, "tensor_parallel_all_reduce", _identity),
        mock.patch.object(distributed, "tensor_parallel_all_gather", _identity),
    ):
        yield


def _rank_entry(rank: int, world_size: int, port: int, function: Callable, args: tuple) -> None:
    distributed.init_distributed(rank, world_size, f"tcp://127.0.0.1:{port}", backend="gloo")
    try:
        function(*args)
    finally:
        distributed.destroy_distributed()


def run_on_ranks(function: Callable, world_size: int, *args) -> None:
    """Runs `function(*args)` on each of `world_size` gloo ranks; an exception on any rank fails the call.

    `function` must be importable by name (module level) since the ranks are spawned processes.
    """
    mp.spawn(
        _rank_entry,
        args=(world_size, distributed.find_free_port(), function, args),
        nprocs=world_size,
        join=True,
    )


def fused_qkv(
    layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, dim: int
) -> torch.Tensor:
    """A fused checkpoint tensor in `layout` from full q [H*D, ...], k, v [KV*D, ...]."""
    rest = q.shape[1:]
    if layout == "concatenated":
        return torch.cat([q, k, v])
    if layout == "per_head":
        split = [t.reshape(heads, 1, dim, *rest) for t in (q, k, v)]
        return torch.cat(split, dim=1).reshape(3 * heads * dim, *rest)
    group = heads // kv_heads
    grouped = torch.cat(
        [
            q.reshape(kv_heads, group, dim, *rest),
            k.reshape(kv_heads, 1, dim, *rest),
            v.reshape(kv_heads, 1, dim, *rest),
        ],
        dim=1,
    )
    return grouped.reshape((heads + 2 * kv_heads) * dim, *rest)
