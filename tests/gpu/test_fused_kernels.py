"""Fused Triton kernels (RMSNorm + residual, rotary, gated activations) against the layers' PyTorch code.

Kernel-level cases (tests/engine/kernels/fused_cases.py) draw random inputs, NaN-poison the outputs
and compare with the reference computed by the layer itself under PORTER_FORCE_REFERENCE=1 from the
same low-precision inputs; layer-level cases check the dispatch wiring (CUDA takes the kernel, the
variable forces the reference) and that the ops replay correctly inside a captured CUDA graph.
Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from engine.layers import GeluAndMul, RMSNorm, SiluAndMul, get_gated_activation, get_rope
from tests.engine.kernels.fused_cases import (
    ROTARY_TOLERANCE,
    assert_close,
    check_gated_activation,
    check_rms_norm,
    check_rotary,
    forced_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TOKENS = [1, 7, 256]
NORM_VARIANTS = {"llama": (0.0, False), "gemma": (1.0, True)}


# --- RMSNorm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 1000, 4096, 5120, 8192])
@pytest.mark.parametrize("num_tokens", TOKENS)
@pytest.mark.parametrize("variant", list(NORM_VARIANTS))
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel(dtype, hidden, num_tokens, variant, with_residual):
    offset, in_float32 = NORM_VARIANTS[variant]
    check_rms_norm((num_tokens, hidden), dtype, "cuda", offset, in_float32, with_residual, seed=hidden)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(NORM_VARIANTS))
def test_rms_norm_kernel_on_strided_head_views(dtype, variant):
    # q/k norms (Qwen3, Gemma3): [T, heads, head_dim] views into a wider projection output.
    offset, in_float32 = NORM_VARIANTS[variant]
    for shape in ((1, 8, 128), (37, 32, 128), (5, 3, 256)):
        check_rms_norm(shape, dtype, "cuda", offset, in_float32, strided=True)
    check_rms_norm((2, 3, 4, 96), dtype, "cuda", offset, in_float32, with_residual=True)


@pytest.mark.parametrize("offset,in_float32", [(0.5, False), (0.0, True)])
def test_rms_norm_kernel_other_variants(offset, in_float32):
    for dtype in DTYPES:
        check_rms_norm((33, 3000), dtype, "cuda", offset, in_float32, with_residual=True)
    # A float32 weight with bf16 activations (a norm kept in float32) in the float32 multiply.
    check_rms_norm((9, 512), torch.bfloat16, "cuda", 1.0, True, weight_dtype=torch.float32)


def test_rms_norm_kernel_wide_row():
    check_rms_norm((3, 16000), torch.bfloat16, "cuda", with_residual=True)  # near MAX_HIDDEN


# --- rotary --------------------------------------------------------------------------------------

ROTARY_LAYOUTS = {
    "neox": dict(num_heads=32, num_kv_heads=8, head_dim=128, rotary_dim=128, is_neox_style=True),
    "gptj": dict(num_heads=16, num_kv_heads=16, head_dim=256, rotary_dim=64, is_neox_style=False),
    "neox-partial": dict(num_heads=32, num_kv_heads=32, head_dim=80, rotary_dim=32, is_neox_style=True),
    "gptj-full": dict(num_heads=12, num_kv_heads=4, head_dim=64, rotary_dim=64, is_neox_style=False),
    "odd-half": dict(num_heads=5, num_kv_heads=1, head_dim=96, rotary_dim=96, is_neox_style=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(ROTARY_LAYOUTS))
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_rotary_kernel(dtype, layout, num_tokens):
    check_rotary(num_tokens, **ROTARY_LAYOUTS[layout], dtype=dtype, device="cuda", max_position=131072)


def test_rotary_kernel_scaled_cos_sin():
    for dtype in DTYPES:
        check_rotary(64, 8, 2, 128, 128, True, dtype, "cuda", scaling=1.2345)


def _llama_config(rope_parameters: dict, max_position: int = 4096) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=max_position,
        rope_parameters=rope_parameters,
    )


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 1e4},
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},  # recomputed past max_position
    ],
    ids=["default", "yarn", "dynamic"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_rotary_layer_rotates_qkv_views_in_place(rope_parameters, dtype, reverse):
    rope = get_rope(_llama_config(dict(rope_parameters), max_position=1024), 128, reverse=reverse).cuda()
    num_tokens, q_size, kv_size = 19, 4 * 128, 2 * 128
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device="cuda").to(dtype)
    positions = torch.randperm(3000, device="cuda")[:num_tokens]  # unsorted; past 1024 for "dynamic"
    q, k = qkv[:, :q_size], qkv[:, q_size : q_size + kv_size]  # 2-D [T, heads*D] strided views
    with forced_reference():
        expected_q, expected_k = rope(positions, q.clone(), k.clone())
    out_q, out_k = rope(positions, q, k)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "expected in place on CUDA"
    assert_close(out_q, expected_q, "rotary layer query", ROTARY_TOLERANCE)
    assert_close(out_k, expected_k, "rotary layer key", ROTARY_TOLERANCE)


def test_rotary_layer_hand_sliced_partial_rotary():
    # Phi-style: the caller slices the rotary part itself and passes [T, heads, rotary_dim] views.
    config = _llama_config({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    rope = get_rope(config, 128).cuda()
    q = torch.randn(9, 4, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(9, 2, 128, device="cuda", dtype=torch.float16)
    positions = torch.randint(0, 4096, (9,), device="cuda")
    with forced_reference():
        expected_q, expected_k = rope(positions, q.clone(), k.clone())
    q_rot, k_rot = q[..., :64], k[..., :64]
    rope(positions, q_rot, k_rot)
    assert_close(q, expected_q, "sliced query", ROTARY_TOLERANCE)
    assert_close(k, expected_k, "sliced key", ROTARY_TOLERANCE)


# --- gated activations ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("width", [64, 1000, 5120, 14336])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_gated_activation_kernel(dtype, activation, width, num_tokens):
    check_gated_activation(activation, (num_tokens, 2 * width), dtype, "cuda", seed=width)


def test_gated_activation_kernel_extreme_inputs():
    # exp/tanh overflow and underflow at the tails must saturate, not produce NaN/inf.
    x = torch.tensor([[-100.0, -30.0, 0.0, 30.0, 100.0] * 2], device="cuda")
    for layer in (SiluAndMul(), GeluAndMul(), GeluAndMul("tanh")):
        out = layer(x)
        with forced_reference():
            expected = layer(x)
        assert torch.isfinite(out).all()
        assert_close(out, expected, f"{layer} at the tails")


# --- layer wiring --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layers_take_the_kernels_and_the_variable_forces_the_reference(dtype, monkeypatch):
    x = torch.randn(13, 4096, device="cuda").to(dtype)
    residual = torch.randn(13, 4096, device="cuda").to(dtype)
    norm = RMSNorm(4096, eps=1e-5).to("cuda", dtype)
    norm.weight.data.normal_()
    normed, new_residual = norm(x, residual)
    with forced_reference():
        expected_normed, expected_residual = norm(x, residual)
    assert torch.equal(new_residual, expected_residual)
    assert_close(normed, expected_normed, "RMSNorm layer")
    gemma = RMSNorm(4096, weight_offset=1.0, multiply_in_float32=True).to("cuda", dtype)
    gemma.weight.data.normal_()
    with forced_reference():
        expected = gemma(x)
    assert_close(gemma(x), expected, "Gemma RMSNorm layer")

    gate_up = torch.randn(13, 2 * 3000, device="cuda").to(dtype)
    for name in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new"):
        layer = get_gated_activation(name)
        with forced_reference():
            expected = layer(gate_up)
        assert_close(layer(gate_up), expected, f"get_gated_activation({name!r})")

    # Under the variable the layer runs its eager code: bit-identical to writing it out.
    monkeypatch.setenv("PORTER_FORCE_REFERENCE", "1")
    hidden = x.float() * torch.rsqrt((x.float() ** 2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(norm(x), norm.weight * hidden.to(dtype))


def test_fused_ops_replay_in_a_cuda_graph():
    """norm(+residual) -> rotary -> gated activation, captured once, replayed on new inputs."""
    dtype, num_tokens = torch.bfloat16, 8
    norm = RMSNorm(512, eps=1e-6).to("cuda", dtype)
    norm.weight.data.normal_()
    rope = get_rope(_llama_config({"rope_type": "default", "rope_theta": 10000.0}), 128).cuda()
    act = SiluAndMul()
    x = torch.randn(num_tokens, 512, device="cuda").to(dtype)
    residual = torch.randn(num_tokens, 512, device="cuda").to(dtype)
    positions = torch.zeros(num_tokens, dtype=torch.long, device="cuda")
    qkv = torch.zeros(num_tokens, 4 * 128 + 2 * 2 * 128, device="cuda", dtype=dtype)

    def step():
        normed, new_residual = norm(x, residual)
        qkv.copy_(torch.cat([normed, normed[:, :256], normed[:, 256:]], dim=-1))
        q, k = rope(positions, qkv[:, :512], qkv[:, 512:768])
        return new_residual, q.clone(), k.clone(), act(torch.cat([normed, normed], dim=-1))

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = step()
    for seed in range(3):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(x.shape, generator=generator, device="cuda"))
        residual.copy_(torch.randn(residual.shape, generator=generator, device="cuda"))
        positions.copy_(torch.randint(0, 4096, (num_tokens,), generator=generator, device="cuda"))
        graph.replay()
        eager = step()
        for replayed, expected in zip(static_outputs, eager):
            assert torch.equal(replayed, expected), f"replay {seed} differs from eager"


def test_dispatch_leaves_what_the_kernels_do_not_take_to_the_reference():
    from engine.kernels import dispatch

    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    assert dispatch.can_fuse_rms_norm(x, torch.ones(256, device="cuda", dtype=torch.bfloat16))
    # Llama arithmetic with a float32 weight promotes the output: left to PyTorch.
    assert not dispatch.can_fuse_rms_norm(x, torch.ones(256, device="cuda"))
    assert dispatch.can_fuse_rms_norm(x, torch.ones(256, device="cuda"), multiply_in_float32=True)
    assert not dispatch.can_fuse_rms_norm(x, x[0], x.float())  # residual of another dtype
    heads = x.view(4, 4, 64)
    assert not dispatch.can_fuse_rotary(torch.arange(4, device="cuda"), heads, heads)  # q is k
    assert not dispatch.can_fuse_gated_activation(x.double())

    wide = RMSNorm(20000).to("cuda", torch.bfloat16)  # over MAX_HIDDEN: PyTorch
    rows = torch.randn(3, 20000, device="cuda", dtype=torch.bfloat16)
    with forced_reference():
        expected = wide(rows)
    assert torch.equal(wide(rows), expected)
