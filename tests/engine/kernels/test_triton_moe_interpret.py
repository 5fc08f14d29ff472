"""The Triton grouped-GEMM experts kernel run by Triton's interpreter on the CPU (TRITON_INTERPRET=1),
checked against the PyTorch reference (tests/engine/kernels/moe_cases.py)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.engine.kernels.test_triton_interpret import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

MOE_CASES = """
from tests.engine.kernels.moe_cases import check_alignment, check_fused_experts
check_alignment(37, 5, 2, 16, "cpu")
check_alignment(3, 8, 3, 16, "cpu")
for dtype in (torch.float32, torch.float16):
    check_fused_experts(21, 6, 2, 48, 40, dtype, "cpu")       # sizes that are no multiple of the tiles
check_fused_experts(3, 4, 2, 32, 32, torch.float32, "cpu")       # decode-sized batch
check_fused_experts(19, 5, 3, 32, 24, torch.float32, "cpu", foreign_ids=True)  # expert parallel
check_fused_experts(300, 4, 2, 32, 16, torch.float32, "cpu", seed=3)  # BLOCK_M 64 tiles
"""

BIASED_CASES = """
from tests.engine.kernels.moe_cases import check_biased_experts
for interleaved in (False, True):
    for own_activation in (False, True):
        check_biased_experts(21, 5, 2, 48, 40, torch.float32, "cpu", interleaved, own_activation)
check_biased_experts(7, 4, 2, 32, 24, torch.float16, "cpu", True, True)
"""


def test_fused_experts_kernel_under_interpreter():
    run_interpreted(MOE_CASES)


def test_biased_interleaved_experts_kernel_under_interpreter():
    run_interpreted(BIASED_CASES)
