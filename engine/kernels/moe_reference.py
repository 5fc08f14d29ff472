"""Plain PyTorch mixture-of-experts: the CPU path and the oracle the Triton grouped GEMM is tested against.

Experts' weights are stacked: `gate_up` `[E, 2I, H]` and `down` `[E, H, I]`, with optional biases
`gate_up_bias` `[E, 2I]` and `down_bias` `[E, H]`. Token t goes through its `k` chosen experts;
expert e computes `down[e] @ gated(gate_up[e] @ x + gate_up_bias[e]) + down_bias[e]` and the results
are summed with the routing weights. `gated` maps the `[n, 2I]` projection to `[n, I]`; without it the
projection is each expert's gate rows, then its up rows, and `gated` is `activation(gate) * up`.
Expert ids outside `[0, E)` (experts another rank holds, under expert parallelism) contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fused_experts_reference(
    hidden_states: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[T, H]` tokens through their chosen experts -> `[T, H]` in the tokens' dtype, one expert at a time."""
    num_experts, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    output = torch.zeros_like(hidden_states)
    for expert in torch.unique(topk_ids).tolist():
        if not 0 <= expert < num_experts:
            continue
        token_index, slot = torch.where(topk_ids == expert)
        projected = hidden_states[token_index] @ gate_up[expert].t()
        if gate_up_bias is not None:
            projected = projected + gate_up_bias[expert]
        if gated is None:
            gate, up = projected[:, :intermediate], projected[:, intermediate:]
            activated = activation(gate) * up
        else:
            activated = gated(projected)
        expert_out = activated @ down[expert].t()
        if down_bias is not None:
            expert_out = expert_out + down_bias[expert]
        weights = topk_weights[token_index, slot, None].to(expert_out.dtype)
        output.index_add_(0, token_index, (expert_out * weights).to(output.dtype))
    return output
