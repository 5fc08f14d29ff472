"""Gated activations on a fused gate|up projection: `act(x[..., :d]) * x[..., d:]`.

`get_gated_activation(hidden_act)` is the layer a gated MLP uses after its gate and up projections
are fused: the activations whose HF definition is exactly a PyTorch op map to a fused layer (one
Triton kernel on CUDA), every other name to `GatedActivation(ACT2FN[name])`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from engine.kernels import dispatch


class SiluAndMul(nn.Module):
    """SwiGLU: `silu(gate) * up` for `x = [gate | up]` of width 2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.can_fuse_gated_activation(x):
            return dispatch.fused_gated_activation(x, "silu")
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """GeGLU: `gelu(gate) * up`; `approximate` is "none" (erf) or "tanh", as in `F.gelu`."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.can_fuse_gated_activation(x):
            return dispatch.fused_gated_activation(x, "gelu" if self.approximate == "none" else "gelu_tanh")
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class GatedActivation(nn.Module):
    """`act(gate) * up` for any activation callable (an `ACT2FN` entry), in PyTorch."""

    def __init__(self, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act_fn(gate) * up


# HF activation names whose ACT2FN module is exactly the PyTorch op a fused layer computes.
# Deliberately absent: "gelu_new", "gelu_fast", "gelu_python_tanh" (the tanh formula written out
# in separate torch ops, which round differently in bf16/fp16; transformers' own GELUTanh docstring
# calls them "not an exact numerical match"), and "gelu_python" (erf written out).
_FUSED_GATED = {
    "silu": SiluAndMul,  # SiLUActivation: F.silu
    "swish": SiluAndMul,  # nn.SiLU
    "gelu": lambda: GeluAndMul("none"),  # GELUActivation: F.gelu
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),  # GELUTanh: F.gelu(approximate="tanh")
}


def get_gated_activation(hidden_act: str) -> nn.Module:
    """The layer computing `ACT2FN[hidden_act](x[..., :d]) * x[..., d:]` for `x = [gate | up]`.

    "silu"/"swish" -> `SiluAndMul`, "gelu" -> `GeluAndMul("none")`, "gelu_pytorch_tanh" ->
    `GeluAndMul("tanh")` (fused on CUDA); any other ACT2FN name -> `GatedActivation(ACT2FN[name])`.
    Raises KeyError for a name transformers does not know.
    """
    if hidden_act in _FUSED_GATED:
        return _FUSED_GATED[hidden_act]()
    if hidden_act not in ACT2FN:
        raise KeyError(f"unknown activation {hidden_act!r}; transformers knows {sorted(ACT2FN)}")
    return GatedActivation(ACT2FN[hidden_act])
