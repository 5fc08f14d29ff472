"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder layer."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, computed in float32 and cast back, like HF's LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`norm(x)`; with `residual`, `(norm(x + residual), x + residual)` (the new residual stream)."""
        if residual is not None:
            x = x + residual  # in the activations' dtype, as the HF decoder layer adds it
            residual = x
        input_dtype = x.dtype
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = self.weight * hidden.to(input_dtype)
        return normed if residual is None else (normed, residual)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
