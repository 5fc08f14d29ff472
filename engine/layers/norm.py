"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder layer; and
its head-sharded form for a norm over all heads of q or k under tensor parallelism."""

from __future__ import annotations

import torch
from torch import nn

from engine import distributed
from engine.distributed import tensor_parallel_all_reduce
from engine.kernels import dispatch
from engine.layers.head_sharding import rank_heads
from engine.layers.linear import check_full_shape, copy_checked


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps)` in float32, then the weight, in one of the two ways HF models apply it.

    - `multiply_in_float32=False` (Llama, Mistral, Qwen, ...): cast back to the input dtype first,
      then `(weight + weight_offset) * normed` in the weight's dtype, like `LlamaRMSNorm`.
    - `multiply_in_float32=True` (Gemma): `normed * (weight_offset + weight.float())` in float32,
      then cast, like `Gemma2RMSNorm` (which stores the weight as an offset from one:
      `weight_offset=1.0`).

    The weight starts at `1 - weight_offset` (scale one; zeros for Gemma, as HF initialises it) and
    is `self.weight`, so checkpoints load unchanged. On CUDA this runs as one Triton kernel
    (`engine.kernels.dispatch.fused_rms_norm`); the PyTorch code below is the reference it matches.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        weight_offset: float = 0.0,
        multiply_in_float32: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight_offset = float(weight_offset)
        self.multiply_in_float32 = multiply_in_float32
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - self.weight_offset), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`norm(x)`; with `residual`, `(norm(x + residual), x + residual)` (the new residual stream).

        x is `[..., hidden]` (a `[T, heads, head_dim]` view for per-head q/k norms works as is). The
        results are new tensors; x and residual are left unchanged.
        """
        if dispatch.can_fuse_rms_norm(x, self.weight, residual, self.multiply_in_float32):
            normed, new_residual = dispatch.fused_rms_norm(
                x, self.weight, self.eps, residual, self.weight_offset, self.multiply_in_float32
            )
            return normed if new_residual is None else (normed, new_residual)
        return self._forward_reference(x, residual)

    def _forward_reference(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual  # in the activations' dtype, as the HF decoder layer adds it
            residual = x
        hidden = x.float()
        normed = self._scale(hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps), x.dtype)
        return normed if residual is None else (normed, residual)

    def _scale(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight times the normalized float32 `hidden`, in the configured order, as `dtype`."""
        if self.multiply_in_float32:
            return (hidden * (self.weight_offset + self.weight.float())).to(dtype)
        weight = self.weight + self.weight_offset if self.weight_offset else self.weight
        return weight * hidden.to(dtype)

    def extra_repr(self) -> str:
        extra = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        extra += ", multiply_in_float32=True" if self.multiply_in_float32 else ""
        return f"{self.hidden_size}, eps={self.eps}{extra}"


class HeadShardedRMSNorm(RMSNorm):
    """RMSNorm over all heads of q (or k) at once, `num_heads * head_dim` wide (OLMo2's q/k norms),
    where tensor parallelism gives each rank only some of the heads.

    Each rank holds the weight of its heads and normalizes its heads' features by the root mean
    square over every head: the sum of squares is all-reduced across the ranks (divided by how many
    ranks hold a replicated KV head) before the mean. The heads a rank holds are the ones
    `QKVParallelLinear` gives it: query heads evenly, KV heads evenly or, with more ranks than KV
    heads, replicated (`kv=True`). At tp=1 it is exactly `RMSNorm(num_heads * head_dim)`.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        eps: float = 1e-6,
        weight_offset: float = 0.0,
        multiply_in_float32: bool = False,
        kv: bool = False,
    ) -> None:
        local_heads, first_head = rank_heads(num_heads, kv)
        self.replicas = max(1, distributed.get_tp_size() // num_heads) if kv else 1
        super().__init__(local_heads * head_dim, eps, weight_offset, multiply_in_float32)
        self.full_size = num_heads * head_dim
        self.first_feature = first_head * head_dim
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        check_full_shape(loaded_weight, (self.full_size,), type(self).__name__)
        copy_checked(
            param, loaded_weight.narrow(0, self.first_feature, self.hidden_size), type(self).__name__
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            raise ValueError("HeadShardedRMSNorm takes no residual (it normalizes q or k, not the stream)")
        if distributed.get_tp_size() == 1:
            return super().forward(x)
        hidden = x.float()
        squares = tensor_parallel_all_reduce(hidden.pow(2).sum(-1, keepdim=True)) / self.replicas
        return self._scale(hidden * torch.rsqrt(squares / self.full_size + self.eps), x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, of {self.full_size} across ranks"


class FeatureShardedRMSNorm(HeadShardedRMSNorm):
    """RMSNorm over a tensor tensor parallelism splits by features: the activation between a
    column-parallel and a row-parallel Linear (BitNet's sub-norm before its down projection). Each
    rank holds its contiguous slice of the `hidden_size` features and their weight, and all-reduces
    the sum of squares; at tp=1 it is exactly `RMSNorm(hidden_size)`."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        weight_offset: float = 0.0,
        multiply_in_float32: bool = False,
    ) -> None:
        # one-feature "heads": a rank holds hidden_size / tp of them, in rank order
        super().__init__(hidden_size, 1, eps, weight_offset, multiply_in_float32)
