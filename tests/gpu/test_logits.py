"""The LM head on a GPU: float32 logits written by the GEMM itself (`torch.mm(..., out_dtype=)`).

Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from engine.layers import LogitsProcessor, ParallelLMHead, vocab_embedding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_come_out_of_the_gemm_in_float32(dtype):
    torch.manual_seed(0)
    vocab, hidden = 1000, 256
    head = ParallelLMHead(vocab, hidden).to("cuda", dtype)
    torch.nn.init.normal_(head.weight, std=0.05)
    states = torch.randn(37, hidden, device="cuda", dtype=dtype)
    logits = LogitsProcessor(vocab)(head, states, None)
    assert logits.dtype == torch.float32 and logits.shape == (37, vocab)
    assert vocab_embedding._MM_TO_FLOAT["supported"], "this torch lacks torch.mm(..., out_dtype=)"
    # The float32 product of the same half-precision operands; unrounded to the half dtype.
    expected = states.float() @ head.weight[:vocab].float().t()
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
