"""FusedMoE with expert biases, an interleaved gate|up layout and an activation module over the whole
projection (GPT-OSS's clamped SwiGLU), against the per-token definition, whole and sharded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.moe_reference import fused_experts_reference
from engine.layers.moe import FusedMoE, top_k_softmax
from tests.engine.layers._tp import simulated_rank

E, K, H, INTER = 6, 2, 16, 12


class ClampedSwiGLU(nn.Module):
    """The activation as GPT-OSS writes it, on gate and up rows alternating."""

    def __init__(self):
        super().__init__()
        self.alpha, self.limit = 1.702, 0.5  # a small limit, so the clamps act on these inputs

    def forward(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def per_token_moe(hidden, gate_up, gate_up_bias, down, down_bias, weights, ids, gated):
    """One token and one chosen expert at a time; `gate_up` `[E, 2I, H]` in the interleaved layout."""
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            projected = gate_up[e] @ hidden[t] + gate_up_bias[e]
            out[t] += weights[t, slot] * (down[e] @ gated(projected) + down_bias[e])
    return out


def random_biased_experts(seed=0):
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * INTER, H, generator=generator) * 0.3
    gate_up_bias = torch.randn(E, 2 * INTER, generator=generator) * 0.3
    down = torch.randn(E, H, INTER, generator=generator) * 0.3
    down_bias = torch.randn(E, H, generator=generator) * 0.3
    hidden = torch.randn(9, H, generator=generator)
    logits = torch.randn(9, E, generator=generator)
    return hidden, gate_up, gate_up_bias, down, down_bias, logits


def test_the_clamps_act_on_these_inputs():
    hidden, gate_up, gate_up_bias, *_ = random_biased_experts()
    projected = hidden @ gate_up[0].t() + gate_up_bias[0]
    assert (projected.abs() > ClampedSwiGLU().limit).any()


def test_reference_with_biases_and_a_whole_projection_activation():
    hidden, gate_up, gate_up_bias, down, down_bias, logits = random_biased_experts()
    weights, ids = top_k_softmax(logits, K)
    gated = ClampedSwiGLU()
    got = fused_experts_reference(
        hidden,
        gate_up,
        down,
        weights,
        ids,
        F.silu,
        gated=gated,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
    )
    want = per_token_moe(hidden, gate_up, gate_up_bias, down, down_bias, weights, ids, gated)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_ranks_of_an_interleaved_biased_layer_add_up_to_the_whole(expert_parallel):
    hidden, gate_up, gate_up_bias, down, down_bias, logits = random_biased_experts(1)
    weights, ids = top_k_softmax(logits, K)
    want = per_token_moe(hidden, gate_up, gate_up_bias, down, down_bias, weights, ids, ClampedSwiGLU())
    tp = 3 if expert_parallel else 2
    total = torch.zeros_like(want)
    for rank in range(tp):
        with simulated_rank(rank, tp):
            layer = FusedMoE(
                E,
                K,
                H,
                INTER,
                activation=ClampedSwiGLU(),
                gate_up_layout="interleaved",
                bias=True,
                expert_parallel=expert_parallel,
                checkpoint_transposed=True,
            )
        for param in layer.parameters():
            param.data.fill_(float("nan"))
        stacked = {
            "gate_up_proj": gate_up.transpose(1, 2).contiguous(),  # stored [E, H, 2I], as GPT-OSS saves it
            "down_proj": down.transpose(1, 2).contiguous(),
            "gate_up_proj_bias": gate_up_bias,
            "down_proj_bias": down_bias,
        }
        for name, param in layer.named_parameters():
            param.weight_loader(param, stacked[name])
        assert not any(torch.isnan(p).any() for p in layer.parameters())
        total += layer(hidden, ids, weights)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_a_rank_of_an_interleaved_layout_holds_whole_gate_up_pairs():
    _, gate_up, gate_up_bias, *_ = random_biased_experts(2)
    with simulated_rank(1, 2):
        layer = FusedMoE(E, K, H, INTER, gate_up_layout="interleaved", bias=True)
    layer.gate_up_proj.weight_loader(layer.gate_up_proj, gate_up)
    layer.gate_up_proj_bias.weight_loader(layer.gate_up_proj_bias, gate_up_bias)
    half = INTER  # rank 1 holds intermediate features INTER/2.., rows INTER.. of the interleaved 2I
    torch.testing.assert_close(layer.gate_up_proj.data, gate_up[:, half:])
    torch.testing.assert_close(layer.gate_up_proj_bias.data, gate_up_bias[:, half:])


def test_interleaved_named_activation_and_per_expert_parts():
    hidden, gate_up, _, down, _, logits = random_biased_experts(3)
    weights, ids = top_k_softmax(logits, K)
    layer = FusedMoE(E, K, H, INTER, activation="silu", gate_up_layout="interleaved")
    for expert in range(E):  # gate and up saved apart, one expert at a time
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, gate_up[expert, 0::2], (expert, 0))
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, gate_up[expert, 1::2], (expert, 1))
    layer.down_proj.weight_loader(layer.down_proj, down)
    torch.testing.assert_close(layer.gate_up_proj.data, gate_up)
    silu_and_mul = lambda p: F.silu(p[0::2]) * p[1::2]  # noqa: E731
    want = per_token_moe(
        hidden, gate_up, torch.zeros(E, 2 * INTER), down, torch.zeros(E, H), weights, ids, silu_and_mul
    )
    torch.testing.assert_close(layer(hidden, ids, weights), want, rtol=1e-5, atol=1e-5)


def test_bias_and_layout_errors():
    with pytest.raises(ValueError, match="gate_up_layout must be one of"):
        FusedMoE(E, K, H, INTER, gate_up_layout="paired")
    layer = FusedMoE(E, K, H, INTER, bias=True)
    with pytest.raises(ValueError, match=r"down_proj_bias: expected checkpoint shape \(6, 16\)"):
        layer.down_proj_bias.weight_loader(layer.down_proj_bias, torch.zeros(E, INTER))
    with pytest.raises(ValueError, match="stacked tensor of all experts"):
        layer.down_proj_bias.weight_loader(layer.down_proj_bias, torch.zeros(H), (0, None))
