"""Tensor-parallel linear layers: each takes global sizes and holds this rank's shard.

Weights are `[out_local, in_local]` like `nn.Linear`. Every parameter carries
`weight_loader(param, loaded_weight, shard_id=None)`, which takes the FULL checkpoint tensor and
copies this rank's slice into `param`. `checkpoint_transposed=True` means the checkpoint stores the
weight as `[in, out]` (GPT-2's Conv1D); it is transposed before slicing (biases are 1-D and unaffected).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import distributed

QKV_CHECKPOINT_LAYOUTS = ("concatenated", "per_head", "grouped")


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    """Copies `loaded` into `param` in place, or raises naming the expected and the given shape."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{what}: expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def check_full_shape(loaded: torch.Tensor, expected: Sequence[int], what: str) -> None:
    """Raises when a checkpoint tensor is not the full (unsharded) shape a layer expects."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"{what}: expected checkpoint shape {tuple(expected)}, got {tuple(loaded.shape)}")


def kv_heads_for_rank(total_num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """(number of KV heads this rank holds, index of its first KV head).

    With `tp <= num_kv_heads` the heads are split evenly; with `tp > num_kv_heads` each rank holds
    one replicated head, `rank // (tp / num_kv_heads)`, so the query heads it holds find their group.
    """
    if tp_size <= total_num_kv_heads:
        per_rank = distributed.divide(total_num_kv_heads, tp_size, "number of key/value heads")
        return per_rank, tp_rank * per_rank
    if tp_size % total_num_kv_heads != 0:
        raise ValueError(
            f"the tensor-parallel size ({tp_size}) is not a multiple of the number of "
            f"key/value heads ({total_num_kv_heads}), so the heads cannot be replicated evenly"
        )
    return 1, tp_rank // (tp_size // total_num_kv_heads)


class LinearBase(nn.Module, ABC):
    """Holds the local weight/bias and attaches `weight_loader` to each; subclasses say how to slice."""

    def __init__(
        self,
        input_size_local: int,
        output_size_local: int,
        bias: bool,
        checkpoint_transposed: bool,
        bias_size: int | None = None,
    ) -> None:
        super().__init__()
        self.tp_rank = distributed.get_tp_rank()
        self.tp_size = distributed.get_tp_size()
        self.checkpoint_transposed = checkpoint_transposed
        self.weight = nn.Parameter(torch.empty(output_size_local, input_size_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            size = output_size_local if bias_size is None else bias_size
            self.bias = nn.Parameter(torch.empty(size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def orient(self, param: torch.Tensor, loaded: torch.Tensor) -> torch.Tensor:
        """The checkpoint tensor as `[out, in]` (Conv1D checkpoints store `[in, out]`)."""
        if self.checkpoint_transposed and param.dim() == 2:
            return loaded.t()
        return loaded

    @abstractmethod
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Copies this rank's part of the full checkpoint tensor `loaded_weight` into `param`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole layer."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool = True, checkpoint_transposed: bool = False
    ):
        super().__init__(input_size, output_size, bias, checkpoint_transposed)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        copy_checked(param, self.orient(param, loaded_weight), type(self).__name__)


class ColumnParallelLinear(LinearBase):
    """Output dim sharded: rank r holds output rows `[r*out/tp, (r+1)*out/tp)`."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        checkpoint_transposed: bool = False,
    ) -> None:
        tp_size = distributed.get_tp_size()
        output_local = distributed.divide(output_size, tp_size, "output size of ColumnParallelLinear")
        super().__init__(input_size, output_local, bias, checkpoint_transposed)
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        loaded = self.orient(param, loaded_weight)
        check_full_shape(loaded, (self.output_size, *param.shape[1:]), type(self).__name__)
        rows = param.shape[0]
        copy_checked(param, loaded.narrow(0, self.tp_rank * rows, rows), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return distributed.tensor_parallel_all_gather(out, dim=-1) if self.gather_output else out


class RowParallelLinear(LinearBase):
    """Input dim sharded: each rank computes a partial sum, all-reduced; the bias is added once."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        reduce_results: bool = True,
        checkpoint_transposed: bool = False,
    ) -> None:
        tp_size = distributed.get_tp_size()
        input_local = distributed.divide(input_size, tp_size, "input size of RowParallelLinear")
        super().__init__(input_local, output_size, bias, checkpoint_transposed)
        self.input_size = input_size
        self.output_size = output_size
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        loaded = self.orient(param, loaded_weight)
        if param.dim() == 1:  # the bias is whole on every rank
            copy_checked(param, loaded, f"{type(self).__name__} bias")
            return
        check_full_shape(loaded, (self.output_size, self.input_size), type(self).__name__)
        cols = param.shape[1]
        copy_checked(param, loaded.narrow(1, self.tp_rank * cols, cols), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.reduce_results:
            out = distributed.tensor_parallel_all_reduce(out)
            return out if self.bias is None else out + self.bias
        # The caller sums the partials later: only rank 0's share carries the bias, so it counts once.
        if self.bias is not None and self.tp_rank == 0:
            out = out + self.bias
        return out


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections in one GEMM (e.g. gate|up); each part sharded on its own.

    Rank r holds `part0[r] | part1[r] | ...`, so its output splits into local parts in the same order.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = True,
        checkpoint_transposed: bool = False,
    ) -> None:
        tp_size = distributed.get_tp_size()
        self.output_sizes = list(output_sizes)
        self.local_sizes = [
            distributed.divide(size, tp_size, f"output size {i} of MergedColumnParallelLinear")
            for i, size in enumerate(self.output_sizes)
        ]
        super().__init__(input_size, sum(self.local_sizes), bias, checkpoint_transposed)
        self.input_size = input_size

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        loaded = self.orient(param, loaded_weight)
        if shard_id is None:
            check_full_shape(loaded, (sum(self.output_sizes), *param.shape[1:]), type(self).__name__)
            for index, part in enumerate(torch.split(loaded, self.output_sizes, dim=0)):
                self._load_part(param, part, index)
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"MergedColumnParallelLinear has shard ids 0..{len(self.output_sizes) - 1}, got {shard_id!r}"
            )
        self._load_part(param, loaded, shard_id)

    def _load_part(self, param: nn.Parameter, part: torch.Tensor, index: int) -> None:
        what = f"{type(self).__name__} part {index}"
        check_full_shape(part, (self.output_sizes[index], *param.shape[1:]), what)
        rows = self.local_sizes[index]
        offset = sum(self.local_sizes[:index])
        copy_checked(param.data.narrow(0, offset, rows), part.narrow(0, self.tp_rank * rows, rows), what)


class QKVParallelLinear(LinearBase):
    """The fused q/k/v projection, sharded by heads: output `[q_local | k_local | v_local]`.

    Rank r holds query heads `[r*H/tp, (r+1)*H/tp)` and the KV heads `kv_heads_for_rank` names
    (replicated when tp exceeds the KV head count). `checkpoint_layout` says how a fused checkpoint
    tensor (shard_id None) is laid out along its output dim:
    "concatenated" `[q | k | v]`, "per_head" `[H, 3, D]`, "grouped" `[KV, H/KV + 2, D]`.
    A concatenated tensor may also come in `checkpoint_blocks` equal blocks, each `[q | k | v]` of
    its share of the heads in `checkpoint_order` (CodeGen's four model-parallel shards, each
    `[q | v | k]`: blocks 4, order "qvk"); heads are numbered block by block.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        checkpoint_layout: str = "concatenated",
        checkpoint_transposed: bool = False,
        checkpoint_blocks: int = 1,
        checkpoint_order: str = "qkv",
    ) -> None:
        tp_size, tp_rank = distributed.get_tp_size(), distributed.get_tp_rank()
        total_num_kv_heads = total_num_heads if total_num_kv_heads is None else total_num_kv_heads
        if checkpoint_layout not in QKV_CHECKPOINT_LAYOUTS:
            raise ValueError(
                f"checkpoint_layout must be one of {QKV_CHECKPOINT_LAYOUTS}, got {checkpoint_layout!r}"
            )
        if total_num_heads % total_num_kv_heads != 0:
            raise ValueError(
                f"number of attention heads ({total_num_heads}) is not a multiple of the number of "
                f"key/value heads ({total_num_kv_heads})"
            )
        if sorted(checkpoint_order) != ["k", "q", "v"]:
            raise ValueError(f"checkpoint_order must name q, k and v once each, got {checkpoint_order!r}")
        if (checkpoint_blocks != 1 or checkpoint_order != "qkv") and checkpoint_layout != "concatenated":
            raise ValueError("checkpoint_blocks and checkpoint_order describe a 'concatenated' checkpoint")
        if total_num_heads % checkpoint_blocks or total_num_kv_heads % checkpoint_blocks:
            raise ValueError(
                f"{checkpoint_blocks} checkpoint blocks do not divide {total_num_heads} query and "
                f"{total_num_kv_heads} key/value heads"
            )
        if checkpoint_layout == "per_head" and total_num_kv_heads != total_num_heads:
            raise ValueError(
                f"checkpoint_layout 'per_head' needs as many key/value heads as query heads, "
                f"got {total_num_kv_heads} and {total_num_heads}"
            )
        self.num_heads = distributed.divide(total_num_heads, tp_size, "number of attention heads")
        self.num_kv_heads, self.first_kv_head = kv_heads_for_rank(total_num_kv_heads, tp_size, tp_rank)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, checkpoint_transposed)
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.checkpoint_layout = checkpoint_layout
        self.checkpoint_blocks = checkpoint_blocks
        self.checkpoint_order = checkpoint_order

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        loaded = self.orient(param, loaded_weight)
        if shard_id is None:
            for name, part in zip("qkv", self._split_fused(param, loaded)):
                self._load_projection(param, part, name)
        elif shard_id in ("q", "k", "v"):
            self._load_projection(param, loaded, shard_id)
        else:
            raise ValueError(f"QKVParallelLinear shard ids are 'q', 'k', 'v' or None, got {shard_id!r}")

    def _split_fused(self, param: nn.Parameter, loaded: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Full q, k and v projections (rows `[heads*D]`) out of a fused checkpoint tensor."""
        heads, kv_heads, dim = self.total_num_heads, self.total_num_kv_heads, self.head_dim
        rest = tuple(param.shape[1:])  # (in,) for the weight, () for the bias
        check_full_shape(
            loaded, ((heads + 2 * kv_heads) * dim, *rest), f"fused QKV ({self.checkpoint_layout})"
        )
        if self.checkpoint_layout == "concatenated":
            blocks = self.checkpoint_blocks
            sizes = {"q": heads * dim // blocks, "k": kv_heads * dim // blocks, "v": kv_heads * dim // blocks}
            order = self.checkpoint_order
            parts = loaded.reshape(blocks, -1, *rest).split([sizes[name] for name in order], dim=1)
            by_name = dict(zip(order, parts))
            return tuple(by_name[name].reshape(-1, *rest) for name in "qkv")
        if self.checkpoint_layout == "per_head":
            per_head = loaded.reshape(heads, 3, dim, *rest)
            return tuple(per_head[:, i].reshape(heads * dim, *rest) for i in range(3))
        group = heads // kv_heads  # "grouped": each KV group's queries, then its key, then its value
        grouped = loaded.reshape(kv_heads, group + 2, dim, *rest)
        query = grouped[:, :group].reshape(heads * dim, *rest)
        key = grouped[:, group].reshape(kv_heads * dim, *rest)
        value = grouped[:, group + 1].reshape(kv_heads * dim, *rest)
        return query, key, value

    def _load_projection(self, param: nn.Parameter, full: torch.Tensor, name: str) -> None:
        """Copies this rank's heads of the full `name` projection into its place in `param`."""
        dim, rest = self.head_dim, tuple(param.shape[1:])
        if name == "q":
            total, first, offset, size = self.total_num_heads, self.tp_rank * self.num_heads, 0, self.q_size
        else:
            total, first, size = self.total_num_kv_heads, self.first_kv_head, self.kv_size
            offset = self.q_size if name == "k" else self.q_size + self.kv_size
        what = f"QKVParallelLinear shard {name!r}"
        check_full_shape(full, (total * dim, *rest), what)
        copy_checked(param.data.narrow(0, offset, size), full.narrow(0, first * dim, size), what)
