"""RMSNorm and gated activations against transformers' own modules and activation table."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from engine.layers import GeluAndMul, RMSNorm, SiluAndMul


def make_norms(hidden: int, eps: float, dtype: torch.dtype) -> tuple[RMSNorm, LlamaRMSNorm]:
    weight = torch.randn(hidden)
    ours, theirs = RMSNorm(hidden, eps), LlamaRMSNorm(hidden, eps)
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    return ours.to(dtype), theirs.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_llama_rms_norm(dtype):
    ours, theirs = make_norms(48, 1e-5, dtype)
    x = (torch.randn(7, 48) * 3).to(dtype)
    out = ours(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_residual_returns_normed_sum_and_sum(dtype):
    ours, theirs = make_norms(32, 1e-6, dtype)
    x, residual = torch.randn(5, 32).to(dtype), torch.randn(5, 32).to(dtype)
    normed, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, theirs(x + residual), rtol=0, atol=0)


def test_rms_norm_initial_weight_is_ones():
    assert torch.equal(RMSNorm(6).weight, torch.ones(6))


@pytest.mark.parametrize(
    "layer,hf_name",
    [(SiluAndMul(), "silu"), (GeluAndMul(), "gelu"), (GeluAndMul("tanh"), "gelu_pytorch_tanh")],
)
def test_gated_activation_matches_hf_mlp_gate(layer, hf_name):
    d = 24
    x = torch.randn(2, 5, 2 * d)
    gate, up = x[..., :d], x[..., d:]
    torch.testing.assert_close(layer(x), ACT2FN[hf_name](gate) * up)


def test_gelu_and_mul_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        GeluAndMul("fast")
