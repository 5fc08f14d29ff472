"""FusedMoE: a mixture-of-experts layer whose experts' weights are stacked, sharded across ranks.

Parameters (named as transformers' batched experts name them, so a port keeps the checkpoint's tree):
- `gate_up_proj` `[E_local, 2 * I_local, H]`: each expert's gate rows, then its up rows
  (`gate_up_layout="concatenated"`), or gate and up rows alternating, gate first ("interleaved");
- `down_proj` `[E_local, H, I_local]`;
- with `bias=True`, `gate_up_proj_bias` `[E_local, 2 * I_local]` (in the same layout) and
  `down_proj_bias` `[E_local, H]`.
Tensor parallelism (the default) shards every expert's intermediate size: each rank holds all
experts, computes a partial sum of their down projections, and the layer all-reduces once (one rank
adds the down projection's bias). An interleaved layout is sharded in whole (gate, up) pairs, so a
rank's rows alternate as the checkpoint's do.

`activation` is an ACT2FN name (`act(gate) * up`), or a module taking a rank's `[n, 2 * I_local]`
gate|up projection in the checkpoint's layout to the `[n, I_local]` gated output: an activation a
source writes itself (a clamped SwiGLU), run as it wrote it.
Expert parallelism (`expert_parallel=True`, where the world size divides E) gives each rank
`E / tp` whole experts; tokens routed elsewhere add nothing on this rank, and the same single
all-reduce sums the ranks' shares.

`forward(hidden_states, top_k_index, top_k_weights)` takes the routing a router computed (the
argument order of transformers' experts modules); `route(router_logits)` applies the layer's own
`routing` function, and calling the layer with `router_logits=` does both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN

from engine import distributed
from engine.kernels.dispatch import reference_forced
from engine.kernels.moe_reference import fused_experts_reference
from engine.layers.linear import check_full_shape, copy_checked

Routing = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
GATE_UP_LAYOUTS = ("concatenated", "interleaved")


class FusedMoE(nn.Module):
    """Stacked experts; `hidden_states [T, H]` -> `[T, H]` summed over each token's chosen experts."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        routing: Routing | None = None,
        activation: str | nn.Module = "silu",
        expert_parallel: bool = False,
        reduce_results: bool = True,
        checkpoint_transposed: bool = False,
        gate_up_layout: str = "concatenated",
        bias: bool = False,
    ) -> None:
        super().__init__()
        tp_size, tp_rank = distributed.get_tp_size(), distributed.get_tp_rank()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        if gate_up_layout not in GATE_UP_LAYOUTS:
            raise ValueError(f"gate_up_layout must be one of {GATE_UP_LAYOUTS}, got {gate_up_layout!r}")
        self.routing = routing
        self.gate_up_layout = gate_up_layout
        self.interleaved = gate_up_layout == "interleaved"
        self.activation = activation if isinstance(activation, str) else type(activation).__name__
        self.act_fn = ACT2FN[activation] if isinstance(activation, str) else activation
        self.activates_whole_projection = not isinstance(activation, str)
        self.expert_parallel = expert_parallel
        self.reduce_results = reduce_results
        self.checkpoint_transposed = checkpoint_transposed
        self.tp_rank, self.tp_size = tp_rank, tp_size
        if expert_parallel:
            self.num_local_experts = distributed.divide(num_experts, tp_size, "number of experts")
            self.first_expert = tp_rank * self.num_local_experts
            self.local_intermediate = intermediate_size
        else:
            self.num_local_experts, self.first_expert = num_experts, 0
            self.local_intermediate = distributed.divide(
                intermediate_size, tp_size, "intermediate size of the experts"
            )
        experts, local = self.num_local_experts, self.local_intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * local, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(experts, hidden_size, local), requires_grad=False)
        for param in (self.gate_up_proj, self.down_proj):
            param.weight_loader = self.weight_loader
            param.expert_count = num_experts  # what a per-expert checkpoint must cover (engine.weights)
        self.gate_up_proj_bias = self.down_proj_bias = None
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * local), requires_grad=False)
            self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden_size), requires_grad=False)
            for param in (self.gate_up_proj_bias, self.down_proj_bias):
                param.weight_loader = self.bias_loader

    # --- loading ------------------------------------------------------------------------------------

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """Copies this rank's part of a checkpoint tensor into `gate_up_proj` or `down_proj`.

        shard_id None: the stacked tensor of all experts (`[E, 2I, H]` / `[E, H, I]`, or with the
        last two dims swapped when `checkpoint_transposed`). shard_id `(expert, part)`: one expert's
        projection, part 0 its gate `[I, H]`, part 1 its up `[I, H]`, part None the whole of it
        (gate and up `[2I, H]`, or down `[H, I]`).
        """
        is_down = param is self.down_proj
        if shard_id is None:
            full = loaded_weight.transpose(1, 2) if self.checkpoint_transposed else loaded_weight
            rows = self.hidden_size if is_down else 2 * self.intermediate_size
            cols = self.intermediate_size if is_down else self.hidden_size
            check_full_shape(full, (self.num_experts, rows, cols), f"FusedMoE stacked {self._name(param)}")
            for expert in range(self.num_local_experts):
                stacked = full[self.first_expert + expert]
                if is_down:
                    self._load_expert(param, expert, stacked, None)
                else:
                    gate, up = self._gate_and_up(stacked)
                    self._load_expert(param, expert, gate, 0)
                    self._load_expert(param, expert, up, 1)
            return
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"FusedMoE has experts 0..{self.num_experts - 1}, got expert {expert}")
        if part not in ((None,) if is_down else (None, 0, 1)):
            raise ValueError(f"FusedMoE {self._name(param)} has no part {part!r}")
        local_expert = expert - self.first_expert
        if not 0 <= local_expert < self.num_local_experts:
            return  # another rank holds it under expert parallelism
        if part is None and not is_down:  # one expert's gate and up rows saved together
            check_full_shape(
                loaded_weight,
                (2 * self.intermediate_size, self.hidden_size),
                f"FusedMoE gate_up_proj expert {expert}",
            )
            gate, up = self._gate_and_up(loaded_weight)
            self._load_expert(param, local_expert, gate, 0)
            self._load_expert(param, local_expert, up, 1)
        else:
            self._load_expert(param, local_expert, loaded_weight, part)

    def _load_expert(self, param: nn.Parameter, expert: int, loaded: torch.Tensor, part: int | None) -> None:
        local, full = self.local_intermediate, self.intermediate_size
        first = 0 if self.expert_parallel else self.tp_rank * local
        what = f"FusedMoE {self._name(param)} expert {expert}"
        if part is None:
            check_full_shape(loaded, (self.hidden_size, full), what)
            copy_checked(param.data[expert], loaded.narrow(1, first, local), what)
        else:
            check_full_shape(loaded, (full, self.hidden_size), what)
            copy_checked(self._gate_up_rows(param.data[expert], part), loaded.narrow(0, first, local), what)

    def _gate_and_up(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An expert's whole `[2I, ...]` gate|up rows in the checkpoint's layout -> (gate, up)."""
        if self.interleaved:
            return gate_up[0::2], gate_up[1::2]
        return gate_up.split(self.intermediate_size, dim=0)

    def _gate_up_rows(self, local: torch.Tensor, part: int) -> torch.Tensor:
        """The rows of this rank's `[2 * I_local, ...]` gate|up block holding the gate (0) or the up (1)."""
        if self.interleaved:
            return local[part::2]
        return local.narrow(0, part * self.local_intermediate, self.local_intermediate)

    def bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """This rank's experts' biases (`[E, 2I]` gate|up in its layout, `[E, H]` down) from the stacked tensor."""
        is_down = param is self.down_proj_bias
        width = self.hidden_size if is_down else 2 * self.intermediate_size
        what = f"FusedMoE {'down_proj_bias' if is_down else 'gate_up_proj_bias'}"
        if shard_id is not None:
            raise ValueError(
                f"{what} is loaded from the stacked tensor of all experts, got shard {shard_id!r}"
            )
        check_full_shape(loaded_weight, (self.num_experts, width), what)
        experts = loaded_weight.narrow(0, self.first_expert, self.num_local_experts)
        if is_down:
            copy_checked(param.data, experts, what)
            return
        local = self.local_intermediate
        first = 0 if self.expert_parallel else self.tp_rank * local
        for expert in range(self.num_local_experts):
            for part, rows in enumerate(self._gate_and_up(experts[expert])):
                copy_checked(self._gate_up_rows(param.data[expert], part), rows.narrow(0, first, local), what)

    def _name(self, param: nn.Parameter) -> str:
        return "down_proj" if param is self.down_proj else "gate_up_proj"

    # --- compute ------------------------------------------------------------------------------------

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights `[T, k]`, expert ids `[T, k]`) from the layer's routing function."""
        if self.routing is None:
            raise ValueError("this FusedMoE was built without a routing function; pass the top-k instead")
        return self.routing(router_logits)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
        router_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each token `[T, H]` through its experts, weighted, summed (and all-reduced across ranks)."""
        if router_logits is not None:
            top_k_weights, top_k_index = self.route(router_logits)
        if top_k_index is None or top_k_weights is None:
            raise ValueError("FusedMoE needs top_k_index and top_k_weights, or router_logits")
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must be [T, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"top-k index {tuple(top_k_index.shape)} and weights {tuple(top_k_weights.shape)} must be "
                f"[T, k] for {hidden_states.shape[0]} tokens"
            )
        local_ids = top_k_index - self.first_expert if self.first_expert else top_k_index
        output = self._experts(hidden_states, top_k_weights, local_ids)
        if self.reduce_results and self.tp_size > 1:
            output = distributed.tensor_parallel_all_reduce(output)
        return output

    def _experts(self, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gated = self._gated()
        # Every rank's partial sums are all-reduced: one of them adds the down projection's bias.
        adds_down_bias = self.expert_parallel or self.tp_rank == 0
        down_bias = self.down_proj_bias if adds_down_bias else None
        kernel_computes = self.activates_whole_projection or self.activation in ("silu", "swish")
        if hidden.is_cuda and not reference_forced() and kernel_computes:
            from engine.kernels import triton_moe

            return triton_moe.fused_experts(
                hidden,
                self.gate_up_proj,
                self.down_proj,
                weights,
                ids,
                gate_up_bias=self.gate_up_proj_bias,
                down_bias=down_bias,
                interleaved=self.interleaved,
                gated=self.act_fn if self.activates_whole_projection else None,
            )
        return fused_experts_reference(
            hidden,
            self.gate_up_proj,
            self.down_proj,
            weights,
            ids,
            self.act_fn,
            gated=gated,
            gate_up_bias=self.gate_up_proj_bias,
            down_bias=down_bias,
        )

    def _gated(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The whole gate|up projection -> gated output, where act(gate) * up on its halves does not apply."""
        if self.activates_whole_projection:
            return self.act_fn
        return self._interleaved_act_and_mul if self.interleaved else None

    def _interleaved_act_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate_up[..., 0::2]) * gate_up[..., 1::2]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, local_experts={self.num_local_experts}, top_k={self.top_k}, "
            f"hidden={self.hidden_size}, intermediate_local={self.local_intermediate}, "
            f"activation={self.activation!r}, gate_up_layout={self.gate_up_layout!r}, "
            f"bias={self.gate_up_proj_bias is not None}, expert_parallel={self.expert_parallel}"
        )
