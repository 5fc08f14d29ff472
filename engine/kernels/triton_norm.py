"""Triton RMSNorm, optionally fused with the residual add before it: one pass over each row.

A pre-norm decoder layer computes `s = x + residual`, keeps `s` as the new residual stream and
normalises it. Eagerly that is about eight kernels over the row; here one program reads `x` and the
residual once, writes `s` and `norm(s)`, and never round-trips the float32 intermediates.

The arithmetic follows `engine.layers.norm.RMSNorm` step by step (the sum rounded to the activation
dtype, normalised in float32, and the two ways HF models apply the weight), so results differ from
it only by the order of the sum of squares.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from engine.kernels.triton_math import round_to

# One row is held in registers (wider rows spill: 32768 bf16 needs ~2 KB of stack per thread);
# past this width the layer's PyTorch code runs instead.
MAX_HIDDEN = 16384
# Elements one program handles: narrow rows (q/k norms over a head) are packed several per program.
_ELEMENTS_PER_PROGRAM = 4096


# num_rows is the step's token count (times heads): not specialised on, so a new batch size never
# triggers a compile mid-run.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    out_ptr,
    residual_out_ptr,
    x_ptr,
    residual_ptr,
    weight_ptr,
    num_rows,
    rows_per_outer,
    stride_x_outer,
    stride_x_inner,
    stride_r_outer,
    stride_r_inner,
    hidden,
    eps,
    weight_offset,
    HAS_RESIDUAL: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    MULTIPLY_IN_FLOAT32: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < num_rows
    # Row r of the flattened input is (r // rows_per_outer, r % rows_per_outer) of a 2-level layout:
    # [T, H] rows are (t, 0); [T, heads, D] rows (q/k norms over strided views) are (t, head).
    outer = (rows // rows_per_outer).to(tl.int64)
    inner = (rows % rows_per_outer).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < hidden
    mask = row_mask[:, None] & col_mask[None, :]
    dtype = x_ptr.dtype.element_ty

    x_offsets = (outer * stride_x_outer + inner * stride_x_inner)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    out_offsets = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
    if HAS_RESIDUAL:
        r_offsets = (outer * stride_r_outer + inner * stride_r_inner)[:, None] + cols[None, :]
        residual = tl.load(residual_ptr + r_offsets, mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + residual, dtype)  # the add happens in the activations' dtype, as in HF
        tl.store(residual_out_ptr + out_offsets, x.to(dtype), mask=mask)

    mean_square = tl.sum(x * x, axis=1) / hidden
    normed = x * tl.math.rsqrt(mean_square + eps)[:, None]
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0)
    if MULTIPLY_IN_FLOAT32:
        # Gemma: (offset + weight) and the product in float32, one rounding at the end.
        out = normed * (weight_offset + weight.to(tl.float32))[None, :]
    else:
        # Llama: cast back first, then the weight multiplies in its own dtype (the input's).
        if HAS_OFFSET:
            weight = (weight.to(tl.float32) + weight_offset).to(weight_ptr.dtype.element_ty)
        out = weight.to(tl.float32)[None, :] * round_to(normed, dtype)
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def _two_level_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x as rows of its last dim: (tensor, rows_per_outer, outer stride, inner stride) for the kernel."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        return x, x.shape[1], x.stride(0), x.stride(1)
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x, 1, x.stride(0), 0


def _output(given: torch.Tensor | None, shape: torch.Size, x: torch.Tensor) -> torch.Tensor:
    if given is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    if given.shape != shape or given.dtype != x.dtype or not given.is_contiguous():
        raise ValueError(
            f"outputs must be contiguous {tuple(shape)} {x.dtype}, got {tuple(given.shape)} {given.dtype}"
        )
    return given


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    weight_offset: float = 0.0,
    multiply_in_float32: bool = False,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(norm(s), s)` with `s = x + residual` (or `(norm(x), None)`), as new contiguous tensors.

    x and residual `[..., H]` (any strides with a contiguous last dim; 3-D `[T, heads, D]` views are
    read in place), weight `[H]`. Without `multiply_in_float32` the output is
    `(weight + weight_offset) * normed.to(x.dtype)` (weight in x's dtype); with it,
    `(normed * (weight_offset + weight.float())).to(x.dtype)`. The inputs are not modified.
    `out`/`residual_out`: contiguous tensors shaped and typed like x to write into instead.
    """
    hidden = x.shape[-1]
    if tuple(weight.shape) != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} is over the kernel's {MAX_HIDDEN}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )
    if not multiply_in_float32 and weight.dtype != x.dtype:
        raise ValueError(
            f"weight dtype {weight.dtype} must be the input's {x.dtype} unless multiplying in float32"
        )
    shape = x.shape
    x, rows_per_outer, stride_x_outer, stride_x_inner = _two_level_rows(x)
    out = _output(out, shape, x)
    residual_out = _output(residual_out, shape, x) if residual is not None else None
    if residual is not None:
        residual, _, stride_r_outer, stride_r_inner = _two_level_rows(residual)
    else:
        stride_r_outer = stride_r_inner = 0
    num_rows = out.numel() // hidden if hidden else 0
    if num_rows == 0:
        return out, residual_out

    block_n = triton.next_power_of_2(hidden)
    # From the row width only: a tile that depended on the token count would compile anew per batch size.
    block_rows = max(1, _ELEMENTS_PER_PROGRAM // block_n)
    # About 8-16 elements per thread; wide rows get more warps so no thread holds a long slice.
    num_warps = max(1, min(16, block_rows * block_n // 512))
    device_context = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device_context:
        _rms_norm_kernel[(triton.cdiv(num_rows, block_rows),)](
            out,
            residual_out if residual_out is not None else out,  # never written without a residual
            x,
            residual if residual is not None else x,  # never read without a residual
            weight.contiguous(),
            num_rows,
            rows_per_outer,
            stride_x_outer,
            stride_x_inner,
            stride_r_outer,
            stride_r_inner,
            hidden,
            float(eps),
            float(weight_offset),
            HAS_RESIDUAL=residual is not None,
            HAS_OFFSET=weight_offset != 0.0,
            MULTIPLY_IN_FLOAT32=multiply_in_float32,
            BLOCK_ROWS=block_rows,
            BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return out, residual_out
