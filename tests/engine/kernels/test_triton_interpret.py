"""The Triton kernels' logic on the CPU: run by Triton's interpreter (TRITON_INTERPRET=1).

triton.jit decides at import time whether a kernel is compiled or interpreted, so the cases run in
another Python process with the variable set (tests/engine/kernels/interpreter_process.py): this
test process (and every other test in it that uses Triton normally) never imports a kernel module
in interpreter mode. The cases are the checks of tests/engine/kernels/fused_cases.py and
attention_cases.py on small shapes. Skipped where Triton is not installed.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.engine.kernels.interpreter_process import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

NORM_CASES = """
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for shape in ((1, 64), (7, 1000)):
        for offset, in_f32 in ((0.0, False), (1.0, True), (0.5, False), (0.0, True)):
            for residual in (False, True):
                check_rms_norm(shape, dtype, "cpu", offset, in_f32, with_residual=residual)
check_rms_norm((5, 3, 128), torch.float16, "cpu", strided=True)  # q/k norm on a strided [T, heads, D] view
check_rms_norm((5, 3, 128), torch.float32, "cpu", 1.0, True, with_residual=True, strided=True)
check_rms_norm((2, 3, 4, 48), torch.float32, "cpu", with_residual=True)  # more leading dims
check_rms_norm((4, 80), torch.bfloat16, "cpu", 1.0, True, weight_dtype=torch.float32)
"""

ROTARY_CASES = """
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for neox in (True, False):
        check_rotary(7, 4, 2, 64, 64, neox, dtype, "cpu")           # full rotary, GQA
        check_rotary(5, 3, 3, 80, 32, neox, dtype, "cpu", scaling=0.75)  # partial, odd heads, scaled
check_rotary(1, 2, 1, 96, 96, True, torch.float32, "cpu", max_position=200000)  # half = 48: padded lanes
check_rotary(3, 40, 8, 128, 128, True, torch.float16, "cpu")  # several query head blocks
"""

ACTIVATION_CASES = """
for activation in ("silu", "gelu", "gelu_tanh"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_gated_activation(activation, (7, 2 * 300), dtype, "cpu")
    check_gated_activation(activation, (2, 3, 2 * 1100), torch.float32, "cpu")  # 3-D, two column blocks
check_gated_activation("silu", (1, 2 * 64), torch.float16, "cpu")
"""


# The prefill/mixed-step attention kernel in float32 and float16 (the interpreter's bfloat16 dot
# product is not faithful; the GPU tests cover bfloat16): GQA groups 1/2/4/8, every score feature,
# a head dim padded inside the kernel, a block size that is not a power of two, decode-only rows.
# The step's longest context spans 13 key tiles in float32 (7 in float16), and the 300-token window
# starts 96 keys into it, so whole tiles before the window are skipped in either dtype. The
# interpreter's time grows with heads x tiles: each GQA group runs in one dtype, on as few heads
# as show it (two KV heads where the group leaves room, so heads map past the first KV head).
PREFILL_CASES = """
step = ([40, 1, 20, 5, 1], [40, 17, 70, 400, 100])  # prompt, decode, chunk after cached context
for dtype in (torch.float32, torch.float16):
    for feature in ("alibi", "window", "soft_cap", "all"):  # group 2
        check_prefill(*step, 4, 2, 64, dtype, "cpu", feature)
check_prefill(*step, 2, 2, 64, torch.float32, "cpu", scale=0.125, seed=1)  # group 1
check_prefill(*step, 8, 1, 64, torch.float32, "cpu", scale=0.125, seed=8)  # group 8
check_prefill(*step, 8, 2, 64, torch.float16, "cpu", scale=0.125, seed=4)  # group 4
check_prefill([17, 1], [50, 33], 4, 2, 80, torch.float16, "cpu", "all")
check_prefill([200, 9], [200, 300], 4, 2, 64, torch.float32, "cpu", "all", block_size=12)
check_prefill([1, 1, 1, 1], [1, 16, 17, 700], 4, 1, 128, torch.float32, "cpu", "plain")
"""


def test_rms_norm_kernel_under_interpreter():
    run_interpreted(NORM_CASES)


def test_rotary_kernel_under_interpreter():
    run_interpreted(ROTARY_CASES)


def test_gated_activation_kernel_under_interpreter():
    run_interpreted(ACTIVATION_CASES)


def test_prefill_attention_kernel_under_interpreter():
    run_interpreted(PREFILL_CASES)
