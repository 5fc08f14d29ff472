"""The Triton grouped-GEMM experts against the PyTorch reference on CUDA, and FusedMoE's dispatch.

Kernel cases are tests/engine/kernels/moe_cases.py; the layer case checks that a CUDA FusedMoE
takes the kernel and agrees with itself under PORTER_FORCE_REFERENCE=1. Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from engine.layers.moe import FusedMoE, softmax_top_k
from tests.engine.kernels.fused_cases import forced_reference
from tests.engine.kernels.moe_cases import (
    MOE_TOLERANCE,
    check_alignment,
    check_biased_experts,
    check_fused_experts,
    clamped_swiglu,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape",
    [(1, 8, 2, 256, 128), (7, 8, 2, 512, 384), (256, 64, 8, 1024, 512), (2048, 16, 4, 2048, 768)],
)
def test_fused_experts_kernel(shape, dtype):
    check_fused_experts(*shape, dtype, "cuda")


def test_fused_experts_kernel_with_experts_of_other_ranks():
    check_fused_experts(64, 9, 3, 256, 128, torch.bfloat16, "cuda", foreign_ids=True)


def test_alignment_on_cuda():
    check_alignment(1000, 64, 8, 64, "cuda")


def test_fused_moe_layer_takes_the_kernel_and_matches_reference():
    torch.manual_seed(0)
    layer = FusedMoE(16, 2, 512, 256, routing=lambda x: softmax_top_k(x, 2, True)).cuda().bfloat16()
    for param in layer.parameters():
        param.data.normal_(0, 0.05)
    x = torch.randn(100, 512, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(100, 16, device="cuda")
    got = layer(x, router_logits=logits)
    with forced_reference():
        want = layer(x, router_logits=logits)
    rtol, atol = MOE_TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("own_activation", [False, True])
def test_biased_experts_kernel(dtype, interleaved, own_activation):
    check_biased_experts(300, 16, 4, 512, 384, dtype, "cuda", interleaved, own_activation)
    check_biased_experts(3, 8, 2, 256, 128, dtype, "cuda", interleaved, own_activation, seed=1)


class _ClampedSwiGLU(torch.nn.Module):
    def forward(self, gate_up):
        return clamped_swiglu(gate_up)


def test_biased_interleaved_fused_moe_layer_takes_the_kernel_and_matches_reference():
    torch.manual_seed(0)
    layer = (
        FusedMoE(16, 2, 512, 256, activation=_ClampedSwiGLU(), gate_up_layout="interleaved", bias=True)
        .cuda()
        .bfloat16()
    )
    for param in layer.parameters():
        param.data.normal_(0, 0.05)
    x = torch.randn(100, 512, device="cuda", dtype=torch.bfloat16)
    weights, ids = softmax_top_k(torch.randn(100, 16, device="cuda"), 2, True)
    got = layer(x, ids, weights)
    with forced_reference():
        want = layer(x, ids, weights)
    rtol, atol = MOE_TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
