"""Elementwise math shared by the fused Triton kernels, chosen to round like PyTorch's own CUDA kernels.

The fused kernels stand in for PyTorch reference code, so they call the same single-precision
functions PyTorch's CUDA kernels call: CUDA's libdevice `cosf`, `sinf`, `expf`, `tanhf`, `erff`
(PyTorch builds without fast math), and IEEE division. Triton's own `tl.cos`/`tl.exp` and `/` may
lower to the approximate hardware instructions instead, which differ in the last bits (and `cos` of
a large rotary angle by far more).

Under `TRITON_INTERPRET=1` (kernels run by numpy on the CPU, to check their logic without a GPU)
libdevice cannot be called, so `PRECISE` is False there and numpy's functions are used.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# triton.jit reads the same variable when a kernel module is imported, so this matches how they run.
PRECISE = os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def cos(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.cos(x)
    else:
        return tl.cos(x)


@triton.jit
def sin(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.sin(x)
    else:
        return tl.sin(x)


@triton.jit
def exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def erf(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.erf(x)
    else:
        return tl.erf(x)


@triton.jit
def tanh(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.tanh(x)
    else:
        # The interpreter has no tanh; exp-based, saturating to +-1 where exp overflows or underflows.
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x (float32) rounded to `dtype` and widened back: one eager PyTorch op's output precision."""
    return x.to(dtype).to(tl.float32)
