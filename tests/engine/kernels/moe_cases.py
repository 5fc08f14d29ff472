"""Checks of the Triton grouped-GEMM experts against the PyTorch reference, on any device.

Shared by tests/gpu/test_moe_kernels.py (compiled on CUDA) and
tests/engine/kernels/test_triton_moe_interpret.py (Triton's interpreter on the CPU). Random inputs,
uneven routing (some experts get no token, one gets most), expert ids of other ranks, and a
NaN-poisoned intermediate buffer so a row the kernel never writes shows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels.moe_reference import fused_experts_reference

MOE_TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2)}


def check_fused_experts(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    intermediate: int,
    dtype: torch.dtype,
    device: str,
    foreign_ids: bool = False,
    seed: int = 0,
) -> None:
    from engine.kernels import triton_moe

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator).to(device, dtype)
    gate_up = (torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) * 0.1).to(
        device, dtype
    )
    down = (torch.randn(num_experts, hidden, intermediate, generator=generator) * 0.1).to(device, dtype)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    logits[:, 0] += 2.0  # expert 0 takes most tokens; the last expert none
    logits[:, -1] = -1e4
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    if foreign_ids:
        ids = ids - 1  # expert 0 belongs to another rank now (-1), and the kernel holds E - 1 experts
        gate_up, down = gate_up[1:].contiguous(), down[1:].contiguous()
    ids, weights = ids.to(device), weights.to(device)
    got = triton_moe.fused_experts(x, gate_up, down, weights, ids)
    want = fused_experts_reference(x.float(), gate_up.float(), down.float(), weights, ids, F.silu)
    rtol, atol = MOE_TOLERANCE[dtype]
    assert got.dtype == dtype and got.shape == x.shape
    # The absolute tolerance is relative to the output's scale: with wide experts the outputs reach
    # tens, and an element near zero differs by the rounding of the large terms that cancelled in it
    # (summation order in fp32; the intermediate's rounding to fp16/bf16 between the two GEMMs).
    scale = max(want.abs().amax().item(), 1.0)
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol * scale)


def check_alignment(num_tokens: int, num_experts: int, top_k: int, block_m: int, device: str) -> None:
    """Every (token, slot) row appears once, in a tile of its own expert; tiles hold one expert each."""
    from engine.kernels.triton_moe import align_rows_by_expert

    ids = torch.randint(0, num_experts, (num_tokens, top_k), device=device)
    rows, tile_expert = align_rows_by_expert(ids, num_experts, block_m)
    flat = ids.reshape(-1)
    real = rows < flat.numel()
    assert sorted(rows[real].tolist()) == list(range(flat.numel()))
    tile_of_slot = torch.arange(rows.numel(), device=device) // block_m
    assert torch.equal(flat[rows[real].long()], tile_expert[tile_of_slot[real]].long())


def clamped_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's activation on interleaved gate|up columns (limit 0.5, so the clamps act on these inputs)."""
    gate, up = gate_up[..., ::2].clamp(max=0.5), gate_up[..., 1::2].clamp(min=-0.5, max=0.5)
    return (up + 1) * (gate * torch.sigmoid(gate * 1.702))


def check_biased_experts(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    intermediate: int,
    dtype: torch.dtype,
    device: str,
    interleaved: bool,
    own_activation: bool,
    seed: int = 0,
) -> None:
    """The kernel with expert biases, either gate|up layout, and the fused SiLU or an activation of the
    caller's own over the whole projection, against the reference."""
    from engine.kernels import triton_moe

    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape, scale=0.3):
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    x = tensor(num_tokens, hidden, scale=1.0)
    gate_up, down = tensor(num_experts, 2 * intermediate, hidden), tensor(num_experts, hidden, intermediate)
    gate_up_bias, down_bias = tensor(num_experts, 2 * intermediate), tensor(num_experts, hidden)
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    logits[:, -1] = -1e4  # the last expert gets no token
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    ids, weights = ids.to(device), weights.to(device)
    if own_activation:
        gated = (
            clamped_swiglu
            if interleaved
            else (lambda p: F.gelu(p[..., :intermediate]) * p[..., intermediate:])
        )
    else:
        gated = (lambda p: F.silu(p[..., 0::2]) * p[..., 1::2]) if interleaved else None
    got = triton_moe.fused_experts(
        x,
        gate_up,
        down,
        weights,
        ids,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        interleaved=interleaved,
        gated=gated if own_activation else None,
    )
    want = fused_experts_reference(
        x.float(),
        gate_up.float(),
        down.float(),
        weights,
        ids,
        F.silu,
        gated=gated,
        gate_up_bias=gate_up_bias.float(),
        down_bias=down_bias.float(),
    )
    rtol, atol = MOE_TOLERANCE[dtype]
    assert got.dtype == dtype and got.shape == x.shape
    # Outputs near zero keep the rounding of the larger terms that cancelled in them: atol by scale.
    scale = max(want.abs().amax().item(), 1.0)
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol * scale)
