"""Triton gated activations on a fused gate|up projection: `act(x[..., :d]) * x[..., d:]` in one pass.

Eagerly this is a chunk, an activation kernel writing `act(gate)` out, and a multiply reading it
back. Here each program reads a slice of gate and up and writes the product: 2d elements read and d
written per row, the minimum. The activation is evaluated in float32 with the formulas (and
libdevice functions) of PyTorch's CUDA kernels, rounded to the input dtype, then multiplied, like
`F.silu(gate) * up` / `F.gelu(gate, approximate=...) * up`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from engine.kernels import triton_math
from engine.kernels.triton_math import round_to

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_SILU = tl.constexpr(0)
_GELU = tl.constexpr(1)
_GELU_TANH = tl.constexpr(2)
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2): PyTorch's kAlpha for erf GELU
_TANH_BETA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi): PyTorch's kBeta for tanh GELU
_TANH_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _activation(gate, ACTIVATION: tl.constexpr, PRECISE: tl.constexpr):
    if ACTIVATION == _SILU:
        return tl.math.div_rn(gate, 1.0 + triton_math.exp(-gate, PRECISE))
    elif ACTIVATION == _GELU:
        return gate * 0.5 * (1.0 + triton_math.erf(gate * _SQRT1_2, PRECISE))
    else:
        inner = _TANH_BETA * (gate + _TANH_KAPPA * (gate * gate * gate))
        return 0.5 * gate * (1.0 + triton_math.tanh(inner, PRECISE))


@triton.jit
def _gated_activation_kernel(
    out_ptr,
    x_ptr,
    width,
    stride_x_row,
    stride_out_row,
    ACTIVATION: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_row + width + cols, mask=mask, other=0.0).to(tl.float32)
    activated = round_to(_activation(gate, ACTIVATION, PRECISE), dtype)
    tl.store(out_ptr + row * stride_out_row + cols, (activated * up).to(dtype), mask=mask)


def gated_activation(x: torch.Tensor, activation: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """`act(x[..., :d]) * x[..., d:]` for x `[..., 2d]` -> a new contiguous `[..., d]` in x's dtype.

    activation: "silu" (F.silu), "gelu" (F.gelu, erf), "gelu_tanh" (F.gelu(approximate="tanh")).
    `out`: a contiguous `[..., d]` tensor in x's dtype to write into instead.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.shape[-1] % 2:
        raise ValueError(f"the last dim holds [gate | up] and must be even, got {x.shape[-1]}")
    width = x.shape[-1] // 2
    shape = (*x.shape[:-1], width)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {shape} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, x.shape[-1])  # a view for the usual contiguous projection output
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    num_rows = rows.shape[0]
    block = min(1024, triton.next_power_of_2(width))
    kind = {"silu": _SILU, "gelu": _GELU, "gelu_tanh": _GELU_TANH}[activation].value
    device_context = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device_context:
        _gated_activation_kernel[(num_rows, triton.cdiv(width, block))](
            out,
            rows,
            width,
            rows.stride(0),
            width,
            ACTIVATION=kind,
            PRECISE=triton_math.PRECISE,
            BLOCK=block,
            num_warps=4,
            enable_fp_fusion=False,
        )
    return out
