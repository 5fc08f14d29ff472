"""FusedMoE on the CPU: routing functions, the reference experts against a per-token formula,
tensor- and expert-parallel sharding, and loading per-expert and stacked checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.moe_reference import fused_experts_reference
from engine.layers.moe import (
    FusedMoE,
    SharedExperts,
    scale_routing_weights,
    sigmoid_grouped_top_k,
    softmax_grouped_top_k,
    softmax_top_k,
    top_k_softmax,
)
from tests.engine.layers._tp import simulated_rank

E, K, H, INTER = 6, 2, 16, 12


def per_token_moe(hidden, gate_up, down, weights, ids):
    """The definition, one token and one chosen expert at a time."""
    out = torch.zeros_like(hidden)
    intermediate = gate_up.shape[1] // 2
    for t in range(hidden.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            g = gate_up[e, :intermediate] @ hidden[t]
            u = gate_up[e, intermediate:] @ hidden[t]
            out[t] += weights[t, slot] * (down[e] @ (F.silu(g) * u))
    return out


def random_experts(seed=0):
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * INTER, H, generator=generator) * 0.2
    down = torch.randn(E, H, INTER, generator=generator) * 0.2
    hidden = torch.randn(9, H, generator=generator)
    logits = torch.randn(9, E, generator=generator)
    return hidden, gate_up, down, logits


def test_reference_matches_per_token_definition():
    hidden, gate_up, down, logits = random_experts()
    weights, ids = softmax_top_k(logits, K, renormalize=True)
    got = fused_experts_reference(hidden, gate_up, down, weights, ids, F.silu)
    torch.testing.assert_close(got, per_token_moe(hidden, gate_up, down, weights, ids), rtol=1e-5, atol=1e-5)


def test_reference_skips_experts_outside_the_local_range():
    hidden, gate_up, down, logits = random_experts()
    weights, ids = softmax_top_k(logits, K, renormalize=False)
    shifted = ids - 3  # this rank holds experts 3..5; ids 0..2 become negative: another rank's
    got = fused_experts_reference(hidden, gate_up[3:], down[3:], weights, shifted, F.silu)
    masked = weights * (ids >= 3)
    want = per_token_moe(hidden, gate_up[3:], down[3:], masked, (ids - 3).clamp(min=0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_softmax_top_k_renormalises_only_when_asked():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs = torch.softmax(logits, -1)
    weights, ids = softmax_top_k(logits, 2, renormalize=False)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, probs[:, [1, 2]])
    weights, _ = softmax_top_k(logits, 2, renormalize=True)
    torch.testing.assert_close(weights, probs[:, [1, 2]] / probs[:, [1, 2]].sum())


def test_top_k_softmax_is_a_softmax_over_the_chosen_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = top_k_softmax(logits, 2)
    assert ids.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


def test_sigmoid_grouped_top_k_picks_by_biased_scores_inside_the_best_groups():
    # Groups {0,1} {2,3} {4,5}; the bias lifts expert 5, whose group then wins over {2,3}.
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.9, -1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    weights, ids = sigmoid_grouped_top_k(logits, 2, bias, num_groups=3, top_k_groups=2, renormalize=False)
    assert sorted(ids[0].tolist()) == [0, 5]
    scores = torch.sigmoid(logits)
    torch.testing.assert_close(weights.sort().values, scores[:, [0, 5]].sort().values)  # unbiased weights
    renormalised, _ = sigmoid_grouped_top_k(logits, 2, bias, 3, 2, renormalize=True)
    torch.testing.assert_close(renormalised.sum(-1), torch.ones(1))


def test_sigmoid_grouped_top_k_never_picks_outside_the_kept_groups_under_a_negative_bias():
    # Biased scores [-0.4, -0.4, -0.5, -0.5, -1.5, -1.5]: group {0,1} is kept; experts of the other
    # groups stay out even though every kept score is below zero.
    logits = torch.zeros(1, 6)
    bias = torch.tensor([-0.9, -0.9, -1.0, -1.0, -2.0, -2.0])
    _, ids = sigmoid_grouped_top_k(logits, 2, bias, num_groups=3, top_k_groups=1, renormalize=False)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_softmax_grouped_top_k_keeps_the_groups_with_the_best_expert():
    logits = torch.tensor([[0.0, 0.1, 3.0, -2.0, 2.5, 2.4]])
    weights, ids = softmax_grouped_top_k(logits, 2, num_groups=3, top_k_groups=1)
    assert sorted(ids[0].tolist()) == [2, 3]  # group {2,3} holds the best expert; both come from it
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(weights.sort().values, probs[:, [3, 2]])
    torch.testing.assert_close(scale_routing_weights(weights, 2.5), weights * 2.5)


def per_expert_checkpoint(gate_up, down):
    """(name, tensor) as a per-expert checkpoint stores them: expert e's gate, up and down."""
    for e in range(E):
        yield (e, 0), gate_up[e, :INTER]
        yield (e, 1), gate_up[e, INTER:]
        yield (e, None), down[e]


@pytest.mark.parametrize("expert_parallel", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_ranks_partial_sums_add_up_to_the_whole_layer(expert_parallel, stacked):
    hidden, gate_up, down, logits = random_experts(1)
    weights, ids = softmax_top_k(logits, K, renormalize=True)
    want = per_token_moe(hidden, gate_up, down, weights, ids)
    total = torch.zeros_like(want)
    tp = 2 if not expert_parallel else 3
    for rank in range(tp):
        with simulated_rank(rank, tp):
            layer = FusedMoE(E, K, H, INTER, expert_parallel=expert_parallel)
        for param in (layer.gate_up_proj, layer.down_proj):
            param.data.fill_(float("nan"))
        if stacked:
            layer.gate_up_proj.weight_loader(layer.gate_up_proj, gate_up)
            layer.down_proj.weight_loader(layer.down_proj, down)
        else:
            for shard, tensor in per_expert_checkpoint(gate_up, down):
                param = layer.down_proj if shard[1] is None else layer.gate_up_proj
                param.weight_loader(param, tensor, shard)
        assert not torch.isnan(layer.gate_up_proj).any() and not torch.isnan(layer.down_proj).any()
        total += layer(hidden, ids, weights)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_transposed_stacked_checkpoint_and_own_routing():
    hidden, gate_up, down, logits = random_experts(2)
    layer = FusedMoE(E, K, H, INTER, routing=lambda x: softmax_top_k(x, K, True), checkpoint_transposed=True)
    layer.gate_up_proj.weight_loader(layer.gate_up_proj, gate_up.transpose(1, 2).contiguous())
    layer.down_proj.weight_loader(layer.down_proj, down.transpose(1, 2).contiguous())
    weights, ids = softmax_top_k(logits, K, renormalize=True)
    got = layer(hidden, router_logits=logits)
    torch.testing.assert_close(got, per_token_moe(hidden, gate_up, down, weights, ids), rtol=1e-5, atol=1e-5)


def test_loader_names_shape_and_expert_errors():
    layer = FusedMoE(E, K, H, INTER)
    with pytest.raises(ValueError, match=r"expected checkpoint shape \(6, 24, 16\)"):
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, torch.zeros(E, INTER, H))
    with pytest.raises(ValueError, match="experts 0..5, got expert 6"):
        layer.down_proj.weight_loader(layer.down_proj, torch.zeros(H, INTER), (6, None))
    with pytest.raises(ValueError, match="intermediate size of the experts"):
        with simulated_rank(0, 5):
            FusedMoE(E, K, H, INTER)
    with pytest.raises(ValueError, match="number of experts"):
        with simulated_rank(0, 4):
            FusedMoE(E, K, H, INTER, expert_parallel=True)


def test_shared_experts_gate_scales_each_token():
    torch.manual_seed(0)
    plain, gated = SharedExperts(H, INTER), SharedExperts(H, INTER, gated=True)
    for param in plain.parameters():  # the layers allocate without initialising
        param.data.normal_(0, 0.2)
    gated.load_state_dict({**plain.state_dict(), "expert_gate.weight": torch.randn(1, H)})
    x = torch.randn(5, H)
    torch.testing.assert_close(gated(x), torch.sigmoid(x @ gated.expert_gate.weight.t()) * plain(x))


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = FusedMoE(E, K, H, INTER)


def test_load_named_weights_maps_per_expert_names_and_names_a_missing_expert():
    from engine.weights import load_named_weights

    _, gate_up, down, _ = random_experts(3)
    names = {0: "w1", 1: "w3", None: "w2"}
    checkpoint = [
        (f"mlp.experts.{e}.{names[part]}.weight", tensor)
        for (e, part), tensor in per_expert_checkpoint(gate_up, down)
    ]
    experts = [("gate_up_proj", "w1", 0), ("gate_up_proj", "w3", 1), ("down_proj", "w2", None)]
    model = torch.nn.Module()
    model.mlp = _Block()
    loaded = load_named_weights(model, checkpoint, experts=experts)
    assert len(loaded) == 3 * E
    torch.testing.assert_close(model.mlp.experts.gate_up_proj.data, gate_up)
    torch.testing.assert_close(model.mlp.experts.down_proj.data, down)
    without_last_up = [item for item in checkpoint if item[0] != f"mlp.experts.{E - 1}.w3.weight"]
    with pytest.raises(ValueError, match=r"mlp.experts.gate_up_proj \(shards \['\(5, 1\)'\]\)"):
        load_named_weights(model, without_last_up, experts=experts)
