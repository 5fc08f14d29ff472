"""RMSNorm, optionally fused with the residual add that precedes it in a pre-norm decoder layer."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import dispatch


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
        input_dtype = x.dtype
        hidden = x.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.multiply_in_float32:
            normed = (hidden * (self.weight_offset + self.weight.float())).to(input_dtype)
        else:
            weight = self.weight + self.weight_offset if self.weight_offset else self.weight
            normed = weight * hidden.to(input_dtype)
        return normed if residual is None else (normed, residual)

    def extra_repr(self) -> str:
        extra = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        extra += ", multiply_in_float32=True" if self.multiply_in_float32 else ""
        return f"{self.hidden_size}, eps={self.eps}{extra}"
