"""Checks of the fused Triton kernels against the layers' PyTorch reference, on any device.

Shared by tests/gpu/test_fused_kernels.py (compiled kernels on CUDA) and
tests/engine/kernels/test_triton_interpret.py (the same kernels run by Triton's interpreter on the
CPU). Each check draws random inputs, fills the kernel's outputs with NaN first (so an element it
never writes fails), computes the reference with the layer's own PyTorch code from the same
low-precision inputs, and compares in float32. The kernel modules are imported inside the functions:
under the interpreter TRITON_INTERPRET=1 must be set before they are first imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding

# (rtol, atol) for elementwise results compared in float32. A last-bit difference (sum order in the
# norm, a libm ulp) can flip one rounding of the output dtype; these allow that and nothing more.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
# Rotary outputs are differences of rounded products (cancellation): should cos or sin differ in
# their last float32 bit from PyTorch's, one product may round the other way, an absolute error of
# up to an ulp of the inputs (|x| < ~5) rather than of the result.
ROTARY_TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 4e-2),
}
# The interpreter converts float32 to bfloat16 by truncation, not round-to-nearest: a few ulps.
INTERPRETER_BF16_TOLERANCE = (6e-2, 6e-2)


@contextlib.contextmanager
def forced_reference() -> Iterator[None]:
    """PORTER_FORCE_REFERENCE=1 for the block: the layers run their PyTorch code even on CUDA."""
    before = os.environ.get("PORTER_FORCE_REFERENCE")
    os.environ["PORTER_FORCE_REFERENCE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["PORTER_FORCE_REFERENCE"]
        else:
            os.environ["PORTER_FORCE_REFERENCE"] = before


def rounds_to_nearest(dtype: torch.dtype) -> bool:
    """False for bfloat16 under the interpreter, which truncates instead."""
    return not (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def tolerance(dtype: torch.dtype, table: dict = TOLERANCE) -> tuple[float, float]:
    return table[dtype] if rounds_to_nearest(dtype) else INTERPRETER_BF16_TOLERANCE


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, table: dict = TOLERANCE) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert not actual.isnan().any(), f"{what}: unwritten (NaN) elements"
    rtol, atol = tolerance(expected.dtype, table)
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def strided_rows(shape: tuple[int, ...], dtype: torch.dtype, device: str, generator: torch.Generator):
    """A random tensor of `shape` laid out as a slice of a wider buffer (rows not contiguous)."""
    *lead, last = shape
    wide = torch.randn(*lead, last + 24, generator=generator, device=device) * 2
    return wide.to(dtype)[..., 8 : 8 + last]


# --- RMSNorm -------------------------------------------------------------------------------------


def check_rms_norm(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    weight_offset: float = 0.0,
    multiply_in_float32: bool = False,
    with_residual: bool = False,
    strided: bool = False,
    weight_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> None:
    """triton_norm.rms_norm vs RMSNorm's reference, for x of `shape` (its last dim normalised).

    The weight is in x's dtype (as in a model cast to one dtype) unless `weight_dtype` says otherwise.
    """
    from engine.kernels import triton_norm

    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = shape[-1]
    if strided:
        x = strided_rows(shape, dtype, device, generator)
    else:
        x = (torch.randn(shape, generator=generator, device=device) * 2).to(dtype)
    residual = (torch.randn(shape, generator=generator, device=device)).to(dtype) if with_residual else None
    norm = RMSNorm(hidden, eps=1e-5, weight_offset=weight_offset, multiply_in_float32=multiply_in_float32)
    weight_dtype = weight_dtype or dtype
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=generator, device=device) * 0.5)
    norm = norm.to(device=device, dtype=weight_dtype)
    x_before = x.clone()
    residual_before = residual.clone() if residual is not None else None

    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    residual_out = torch.full(shape, float("nan"), dtype=dtype, device=device) if with_residual else None
    triton_norm.rms_norm(
        x,
        norm.weight,
        norm.eps,
        residual,
        weight_offset,
        multiply_in_float32,
        out=out,
        residual_out=residual_out,
    )
    with forced_reference():
        expected = norm(x, residual)
    label = f"rms_norm {shape} {dtype} offset={weight_offset} f32={multiply_in_float32}"
    if with_residual:
        expected_out, expected_residual = expected
        if rounds_to_nearest(dtype):  # the add is one rounding in either implementation: bit-identical
            assert torch.equal(residual_out, expected_residual), f"{label}: residual sum differs"
        else:
            assert_close(residual_out, expected_residual, label + " residual")
        assert torch.equal(residual, residual_before), f"{label}: residual input was modified"
    else:
        expected_out = expected
    assert torch.equal(x, x_before), f"{label}: input was modified"
    assert_close(out, expected_out, label)


# --- rotary --------------------------------------------------------------------------------------


def check_rotary(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    is_neox_style: bool,
    dtype: torch.dtype,
    device: str,
    scaling: float = 1.0,
    max_position: int = 4096,
    seed: int = 0,
) -> None:
    """triton_rotary.rotary_embedding_ on q/k views of one fused qkv buffer vs RotaryEmbedding's reference.

    Positions are random and unsorted. Besides the rotated values it checks that nothing else in
    the buffer moved: the features past rotary_dim, the value part and the padding stay bit-identical.
    """
    from engine.kernels import triton_rotary

    generator = torch.Generator(device=device).manual_seed(seed)
    q_size, kv_size, pad = num_heads * head_dim, num_kv_heads * head_dim, 8
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size + pad, generator=generator, device=device).to(dtype)
    positions = torch.randint(0, max_position, (num_tokens,), generator=generator, device=device)
    theta = 10000.0
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    rope = RotaryEmbedding(head_dim, rotary_dim, max_position, inv_freq, scaling, is_neox_style).to(device)
    query = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    with forced_reference():
        expected_query, expected_key = rope(positions, query.clone(), key.clone())
    before = qkv.clone()

    triton_rotary.rotary_embedding_(positions, query, key, rope.inv_freq, scaling, rotary_dim, is_neox_style)
    label = f"rotary T={num_tokens} H={num_heads}/{num_kv_heads} D={head_dim} rot={rotary_dim} neox={is_neox_style} {dtype}"
    assert_close(query, expected_query, label + " query", ROTARY_TOLERANCE)
    assert_close(key, expected_key, label + " key", ROTARY_TOLERANCE)
    assert torch.equal(query[..., rotary_dim:], before[:, :q_size].view_as(query)[..., rotary_dim:]), label
    assert torch.equal(qkv[:, q_size + kv_size :], before[:, q_size + kv_size :]), (
        f"{label}: wrote past the key"
    )


# --- gated activations ---------------------------------------------------------------------------

REFERENCE_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda gate: F.gelu(gate, approximate="tanh"),
}


def check_gated_activation(
    activation: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0
) -> None:
    """triton_activation.gated_activation on x `[..., 2d]` vs `act(gate) * up` in PyTorch."""
    from engine.kernels import triton_activation

    generator = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(shape, generator=generator, device=device) * 3).to(dtype)
    width = shape[-1] // 2
    out = torch.full((*shape[:-1], width), float("nan"), dtype=dtype, device=device)
    triton_activation.gated_activation(x, activation, out=out)
    expected = REFERENCE_ACTIVATIONS[activation](x[..., :width]) * x[..., width:]
    assert_close(out, expected, f"{activation} {shape} {dtype}")
