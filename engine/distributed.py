"""Tensor-parallel process group: who this rank is, and the two collectives the layers need.

With no process group initialised the engine is a single rank (rank 0 of 1) and every collective
is the identity, so models run unchanged without torch.distributed.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def init_distributed(rank: int, world_size: int, init_method: str, backend: str | None = None) -> None:
    """Joins the tensor-parallel group: NCCL for CUDA ranks, gloo on CPU."""
    if world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("PORTER_DEVICE") != "cpu" else "gloo"
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now (bound to port 0, read back), for a
    `tcp://127.0.0.1:<port>` rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tp_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_tp_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def tensor_parallel_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over the ranks (in place) and returns it."""
    if get_tp_size() == 1:
        return tensor
    dist.all_reduce(tensor)
    return tensor


def tensor_parallel_all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenates every rank's `tensor` along `dim`, in rank order."""
    world = get_tp_size()
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int, what: str) -> int:
    """`numerator / denominator`, or a clear error naming both numbers when it does not divide."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
