"""The Triton multi-latent attention kernels run by Triton's interpreter on the CPU (TRITON_INTERPRET=1),
checked against the PyTorch reference (tests/engine/kernels/mla_cases.py)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.engine.kernels.test_triton_interpret import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

MLA_CASES = """
from tests.engine.kernels.mla_cases import check_latent_attention
for dtype in (torch.float32, torch.float16):
    # A prompt, a decode token after cached rows, a chunk after cached rows; 20 heads: two head blocks.
    check_latent_attention([9, 1, 4], [9, 23, 40], 20, 32, 8, dtype, "cpu", block_size=8)
check_latent_attention([1, 1], [1, 37], 4, 48, 16, torch.float32, "cpu", block_size=12)  # padded rank
"""


def test_latent_attention_kernels_under_interpreter():
    run_interpreted(MLA_CASES)
