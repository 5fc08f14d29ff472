"""Shared experts: a gated MLP every token goes through beside the routed experts.

Plain (DeepSeek, GLM-4.5: added to the routed output) or scaled per token by
`sigmoid(gate(x))` (Qwen2-MoE's `shared_expert_gate`). Tensor-parallel like any gated MLP:
gate|up column-parallel in one GEMM, down row-parallel (one all-reduce); the sigmoid gate is a
one-output projection every rank holds whole.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import get_gated_activation
from engine.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear


class SharedExperts(nn.Module):
    """`down(act(gate(x)) * up(x))`, times `sigmoid(expert_gate(x))` when `gated`."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, activation: str = "silu", gated: bool = False
    ):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=False)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False)
        self.act_fn = get_gated_activation(activation)
        self.expert_gate = ReplicatedLinear(hidden_size, 1, bias=False) if gated else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.down_proj(self.act_fn(self.gate_up_proj(hidden_states)))
        if self.expert_gate is not None:
            output = torch.sigmoid(self.expert_gate(hidden_states)) * output
        return output
