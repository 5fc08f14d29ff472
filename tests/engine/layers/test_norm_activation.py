"""RMSNorm (Llama and Gemma arithmetic) and gated activations against transformers' own modules and ACT2FN."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from engine.kernels import dispatch
from engine.layers import GatedActivation, GeluAndMul, RMSNorm, SiluAndMul, get_gated_activation


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


# --- RMSNorm variants and get_gated_activation ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemma_variant_matches_gemma2_rms_norm_bit_for_bit(dtype, with_residual):
    hidden = 40
    ours = RMSNorm(hidden, eps=1e-6, weight_offset=1.0, multiply_in_float32=True)
    theirs = Gemma2RMSNorm(hidden, eps=1e-6)
    weight = torch.randn(hidden) * 0.3
    ours.weight.data.copy_(weight)
    theirs.weight.data.copy_(weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x, residual = (torch.randn(6, hidden) * 4).to(dtype), torch.randn(6, hidden).to(dtype)
    if with_residual:
        normed, new_residual = ours(x, residual)
        assert torch.equal(new_residual, x + residual)
        expected = theirs(x + residual)
    else:
        normed, expected = ours(x), theirs(x)
    assert normed.dtype == dtype
    assert torch.equal(normed, expected)


def test_gemma_variant_differs_from_llama_arithmetic_in_bf16():
    # Guards the variant switch: multiplying before or after the cast must give different bits.
    x = (torch.randn(64, 256) * 3).to(torch.bfloat16)
    weight = (torch.randn(256) * 0.5).to(torch.bfloat16)
    gemma = RMSNorm(256, weight_offset=1.0, multiply_in_float32=True).to(torch.bfloat16)
    llama = RMSNorm(256, weight_offset=1.0).to(torch.bfloat16)
    gemma.weight.data.copy_(weight)
    llama.weight.data.copy_(weight)
    assert not torch.equal(gemma(x), llama(x))


def test_offset_without_float32_multiply_adds_the_offset_in_the_weight_dtype():
    norm = RMSNorm(32, eps=1e-5, weight_offset=1.0).to(torch.bfloat16)
    norm.weight.data.copy_(torch.randn(32) * 0.2)
    x = torch.randn(3, 32).to(torch.bfloat16)
    hidden = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(norm(x), (1.0 + norm.weight) * hidden.to(torch.bfloat16))


def test_q_k_norm_on_a_strided_head_view():
    # Qwen3-style: the norm runs over head_dim of a [T, heads, D] view into the fused qkv output.
    ours, theirs = make_norms(16, 1e-6, torch.float32)
    qkv = torch.randn(5, 3 * 4 * 16)
    q = qkv[:, : 4 * 16].view(5, 4, 16)
    torch.testing.assert_close(ours(q), theirs(q), rtol=0, atol=0)


def test_initial_weight_gives_unit_scale():
    assert torch.equal(RMSNorm(6, weight_offset=1.0, multiply_in_float32=True).weight, torch.zeros(6))
    x = torch.randn(2, 6)
    torch.testing.assert_close(
        RMSNorm(6, weight_offset=1.0, multiply_in_float32=True)(x), RMSNorm(6)(x), rtol=0, atol=0
    )
    assert "weight_offset=1.0, multiply_in_float32=True" in repr(RMSNorm(6, 1e-6, 1.0, True))


@pytest.mark.parametrize(
    "name,expected_class",
    [
        ("silu", SiluAndMul),
        ("swish", SiluAndMul),
        ("gelu", GeluAndMul),
        ("gelu_pytorch_tanh", GeluAndMul),
        ("gelu_new", GatedActivation),
        ("gelu_fast", GatedActivation),
        ("quick_gelu", GatedActivation),
        ("relu", GatedActivation),
        ("gelu_python_tanh", GatedActivation),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_get_gated_activation_matches_act2fn_exactly(name, expected_class, dtype):
    layer = get_gated_activation(name)
    assert isinstance(layer, expected_class)
    d = 40
    x = (torch.randn(3, 2, 2 * d) * 3).to(dtype)
    out = layer(x)
    assert out.shape == (3, 2, d) and out.dtype == dtype
    # Bit-exact: the fused layers are chosen only where ACT2FN computes exactly that PyTorch op.
    assert torch.equal(out, ACT2FN[name](x[..., :d]) * x[..., d:])


def test_gelu_tanh_layer_picks_the_tanh_approximation():
    assert get_gated_activation("gelu_pytorch_tanh").approximate == "tanh"
    assert get_gated_activation("gelu").approximate == "none"


def test_get_gated_activation_rejects_unknown_names():
    with pytest.raises(KeyError, match="unknown activation"):
        get_gated_activation("not_an_activation")


def test_fused_kernels_never_taken_for_cpu_tensors():
    x = torch.randn(4, 64)
    assert not dispatch.can_fuse_rms_norm(x, torch.ones(64), x.clone())
    assert not dispatch.can_fuse_gated_activation(x)
    heads = x.view(4, 2, 32)
    assert not dispatch.can_fuse_rotary(torch.arange(4), heads, heads.clone())
