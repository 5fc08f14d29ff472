"""fused-moe and routing: batched experts modules become FusedMoE; router statements a routing function."""

from __future__ import annotations

import textwrap

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    init_value,
    method_code,
    replace_class,
    run_rewrites,
    top_level_names,
    vary,
)

EXPERTS = """
class MiniExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current)
        return final_hidden_states


class MiniRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))

    def forward(self, hidden_states):
        router_logits = nn.functional.linear(hidden_states, self.weight)
        router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        return router_top_value, router_indices


"""

BLOCK = """
class MiniMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = MiniRouter(config)
        self.experts = MiniExperts(config)

    def forward(self, x):
        weights, index = self.gate(x)
        return self.experts(x, index, weights)
"""


def moe_model(experts: str = EXPERTS) -> str:
    with_classes = vary(
        MINI_MODEL, "class MiniMLP(nn.Module):", experts.lstrip() + "class MiniMLP(nn.Module):"
    )
    return replace_class(with_classes, "MiniMLP", BLOCK)


def test_experts_module_becomes_fused_moe_with_sizes_from_its_init_and_top_k_from_the_router():
    after = run_rewrites(moe_model(), "fused-moe")
    assert init_value(after.code, "MiniMLP", "experts") == (
        "FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size, "
        "config.moe_intermediate_size, activation=config.hidden_act)"
    )
    assert "MiniExperts" not in top_level_names(after.code)
    assert ("engine.layers.moe", "FusedMoE") in after.context.plan.engine_imports
    assert_code(  # FusedMoE takes the experts module's arguments: the call site stays
        method_code(after.code, "MiniMLP", "forward"),
        """
        def forward(self, x):
            weights, index = self.gate(x)
            return self.experts(x, index, weights)
        """,
    )


def test_experts_stored_transposed_are_loaded_transposed():
    transposed = vary(
        vary(
            EXPERTS,
            "2 * self.intermediate_dim, self.hidden_dim",
            "self.hidden_dim, 2 * self.intermediate_dim",
        ),
        "self.num_experts, self.hidden_dim, self.intermediate_dim",
        "self.num_experts, self.intermediate_dim, self.hidden_dim",
    )
    after = run_rewrites(moe_model(transposed), "fused-moe")
    assert init_value(after.code, "MiniMLP", "experts").endswith(
        "activation=config.hidden_act, checkpoint_transposed=True)"
    )


def test_experts_whose_gate_and_up_reach_the_down_projection_unnamed_stop_the_port():
    clamped = vary(
        EXPERTS,
        "gate, up = nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)",
        "gate_up = nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx])\n"
        "            gate, up = gate_up[..., ::2].clamp(max=7.0), gate_up[..., 1::2]",
    )
    after = run_rewrites(moe_model(clamped), "fused-moe")
    assert after.review_messages() == [
        "fused-moe @ MiniExperts.forward: an expert activation porter cannot separate from the projections "
        "is not computed by FusedMoE"
    ]


def test_experts_with_a_bias_on_one_projection_only_stop_the_port():
    biased = vary(
        EXPERTS,
        "        self.act_fn = ACT2FN[config.hidden_act]\n",
        "        self.act_fn = ACT2FN[config.hidden_act]\n"
        "        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))\n",
    )
    biased = vary(
        biased,
        "current = current * top_k_weights",
        "current = (current + self.down_proj_bias[expert_idx]) * top_k_weights",
    )
    after = run_rewrites(moe_model(biased), "fused-moe")
    assert after.review_messages() == [
        "fused-moe @ MiniExperts.forward: expert biases other than one each named gate_up_proj_bias and "
        "down_proj_bias (down_proj_bias) is not computed by FusedMoE"
    ]


def test_softmax_top_k_and_conditional_renormalisation_become_one_routing_call():
    after = run_rewrites(moe_model(), "routing")
    assert_code(
        method_code(after.code, "MiniRouter", "forward"),
        """
        def forward(self, hidden_states):
            router_logits = nn.functional.linear(hidden_states, self.weight)
            router_top_value, router_indices = softmax_top_k(router_logits, self.top_k, renormalize=self.norm_topk_prob)
            return router_top_value, router_indices
        """,
    )
    assert ("engine.layers.moe", "softmax_top_k") in after.context.plan.engine_imports


def test_top_k_then_softmax_becomes_top_k_softmax_keeping_the_cast():
    router = """
    def forward(self, hidden_states):
        router_logits = nn.functional.linear(hidden_states, self.weight).float()
        top_k_logits, top_k_index = router_logits.topk(self.top_k, dim=-1)
        top_k_weights = torch.softmax(top_k_logits, dim=-1).type_as(hidden_states)
        return top_k_weights, top_k_index
    """
    source = moe_model().replace(
        textwrap.indent(method_code(moe_model(), "MiniRouter", "forward").strip(), "    "),
        textwrap.indent(textwrap.dedent(router).strip(), "    "),
    )
    after = run_rewrites(source, "routing")
    assert_code(
        method_code(after.code, "MiniRouter", "forward"),
        """
        def forward(self, hidden_states):
            router_logits = nn.functional.linear(hidden_states, self.weight).float()
            top_k_weights, top_k_index = top_k_softmax(router_logits, self.top_k)
            top_k_weights = top_k_weights.type_as(hidden_states)
            return top_k_weights, top_k_index
        """,
    )


def test_probabilities_read_again_keep_the_source_statements():
    kept = vary(
        EXPERTS,
        "        return router_top_value, router_indices\n",
        "        return router_top_value, router_indices, router_probs\n",
    )
    after = run_rewrites(moe_model(kept), "routing")
    assert "softmax_top_k" not in after.code
    assert after.changes("routing") == []


PER_EXPERT_BLOCK = """
class MiniMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList([MiniExpertMLP(config) for _ in range(config.num_local_experts)])

    def forward(self, x):
        routing_weights, selected_experts = torch.topk(self.gate(x).softmax(dim=-1), self.top_k, dim=-1)
        final = torch.zeros_like(x)
        for expert_idx in range(len(self.experts)):
            idx, top_x = torch.where(selected_experts == expert_idx)
            final.index_add_(0, top_x, self.experts[expert_idx](x[top_x]) * routing_weights[top_x, idx, None])
        return final
"""


def test_a_loop_over_expert_modules_still_stops_the_port():
    """Experts held one module each (a ModuleList) are not batched experts: routing stops the port."""
    from porter.analysis.unsupported import find_unsupported
    from tests.porter.rewrite_helpers import make_context

    expert_mlp = (
        "class MiniExpertMLP(nn.Module):\n"
        "    def __init__(self, config):\n"
        "        super().__init__()\n"
        "        self.w1 = nn.Linear(config.hidden_size, config.hidden_size)\n\n"
        "    def forward(self, x):\n"
        "        return self.w1(x)\n\n\n"
    )
    source = replace_class(MINI_MODEL, "MiniMLP", PER_EXPERT_BLOCK)
    source = vary(source, "class MiniAttention(", expert_mlp + "class MiniAttention(")
    tree, context = make_context(source)
    found = find_unsupported(tree, set(context.index.reachable))
    assert [(f.construct, f.where) for f in found] == [("mixture-of-experts routing", "MiniMLP.forward")]
