"""Plain PyTorch mixture-of-experts: the CPU path and the oracle the Triton grouped GEMM is tested against.

Experts' weights are stacked: `gate_up` `[E, 2I, H]` (each expert's gate rows, then its up rows) and
`down` `[E, H, I]`. Token t goes through its `k` chosen experts; expert e computes
`down[e] @ (act(gate[e] @ x) * (up[e] @ x))` and the results are summed with the routing weights.
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
) -> torch.Tensor:
    """`[T, H]` tokens through their chosen experts -> `[T, H]` in the tokens' dtype, one expert at a time."""
    num_experts, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    output = torch.zeros_like(hidden_states)
    for expert in torch.unique(topk_ids).tolist():
        if not 0 <= expert < num_experts:
            continue
        token_index, slot = torch.where(topk_ids == expert)
        projected = hidden_states[token_index] @ gate_up[expert].t()
        gate, up = projected[:, :intermediate], projected[:, intermediate:]
        expert_out = (activation(gate) * up) @ down[expert].t()
        weights = topk_weights[token_index, slot, None].to(expert_out.dtype)
        output.index_add_(0, token_index, (expert_out * weights).to(output.dtype))
    return output
