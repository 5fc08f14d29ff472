"""fused-moe: experts with biases and an activation of their own (GPT-OSS's clamped SwiGLU on
interleaved gate|up rows) -> FusedMoE(bias=True, activation=<Experts>Activation(), gate_up_layout=...)."""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    assert_code,
    class_code,
    init_value,
    run_rewrites,
    top_level_names,
    vary,
)
from tests.porter.test_fused_moe import moe_model

# transformers 5.17's GptOssExperts, sizes renamed to the mini model's config names.
GPT_OSS_EXPERTS = """
class MiniExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.intermediate_size = config.moe_intermediate_size
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, 2 * self.intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size))
        self.down_proj = nn.Parameter(torch.empty((self.num_experts, self.intermediate_size, self.hidden_size)))
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, self.hidden_size))
        self.alpha = 1.702
        self.limit = 7.0

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        gated_output = (up + 1) * glu
        return gated_output

    def forward(self, hidden_states: torch.Tensor, router_indices=None, routing_weights=None) -> torch.Tensor:
        next_states = torch.zeros_like(hidden_states, dtype=hidden_states.dtype, device=hidden_states.device)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(router_indices, num_classes=self.num_experts)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate_up = current_state @ self.gate_up_proj[expert_idx] + self.gate_up_proj_bias[expert_idx]
            gated_output = self._apply_gate(gate_up)
            out = gated_output @ self.down_proj[expert_idx] + self.down_proj_bias[expert_idx]
            weighted_output = out * routing_weights[token_idx, top_k_pos, None]
            next_states.index_add_(0, token_idx, weighted_output.to(hidden_states.dtype))

        return next_states


class MiniRouter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))

    def forward(self, hidden_states):
        router_logits = F.linear(hidden_states, self.weight, self.bias)
        router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)
        router_scores = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
        return router_scores, router_indices


"""

ACTIVATION = '''
class MiniExpertsActivation(nn.Module):
    """The activation of MiniExperts: an expert's gate|up projection -> its gated output."""

    def __init__(self):
        super().__init__()
        self.alpha = 1.702
        self.limit = 7.0

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        gated_output = (up + 1) * glu
        return gated_output
'''


def test_biased_experts_with_their_own_interleaved_activation_keep_it_as_a_module():
    after = run_rewrites(moe_model(GPT_OSS_EXPERTS), "fused-moe")
    assert after.review_messages() == []
    assert init_value(after.code, "MiniMLP", "experts") == (
        "FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size, "
        "config.moe_intermediate_size, checkpoint_transposed=True, activation=MiniExpertsActivation(), "
        "gate_up_layout='interleaved', bias=True)"
    )
    assert "MiniExperts" not in top_level_names(after.code)
    assert_code(class_code(after.code, "MiniExpertsActivation"), ACTIVATION)


def test_an_activation_written_in_the_loop_becomes_the_module_forward_and_reads_config():
    inline = vary(
        GPT_OSS_EXPERTS,
        "            gated_output = self._apply_gate(gate_up)\n",
        "            gate, up = gate_up.chunk(2, dim=-1)\n"
        "            gated_output = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))\n",
    )
    inline = vary(inline, "self.alpha = 1.702", "self.alpha = config.swiglu_alpha")
    after = run_rewrites(moe_model(inline), "fused-moe")
    assert after.review_messages() == []
    assert init_value(after.code, "MiniMLP", "experts").endswith(
        "activation=MiniExpertsActivation(config), bias=True)"  # chunk(2): the concatenated layout
    )
    assert_code(
        class_code(after.code, "MiniExpertsActivation"),
        '''
        class MiniExpertsActivation(nn.Module):
            """The activation of MiniExperts: an expert's gate|up projection -> its gated output."""

            def __init__(self, config):
                super().__init__()
                self.alpha = config.swiglu_alpha

            def forward(self, gate_up):
                gate, up = gate_up.chunk(2, dim=-1)
                gated_output = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
                return gated_output
        ''',
    )


def test_biases_named_otherwise_stop_the_port():
    renamed = GPT_OSS_EXPERTS.replace("down_proj_bias", "down_bias")
    after = run_rewrites(moe_model(renamed), "fused-moe")
    assert after.review_messages() == [
        "fused-moe @ MiniExperts.forward: expert biases other than one each named gate_up_proj_bias and "
        "down_proj_bias (gate_up_proj_bias, down_bias) is not computed by FusedMoE"
    ]


def test_an_activation_reading_the_loops_names_stops_the_port():
    per_token = vary(
        GPT_OSS_EXPERTS,
        "            gated_output = self._apply_gate(gate_up)\n",
        "            gated_output = gate_up[..., ::2] * gate_up[..., 1::2] * routing_weights[token_idx, top_k_pos, None]\n",
    )
    after = run_rewrites(moe_model(per_token), "fused-moe")
    assert after.review_messages() == [
        "fused-moe @ MiniExperts.forward: an expert activation reading the loop's own names (routing_weights, "
        "token_idx, top_k_pos) is not computed by FusedMoE"
    ]


def test_an_activation_whose_gate_and_up_cannot_be_told_apart_stops_the_port():
    halves = vary(
        GPT_OSS_EXPERTS,
        "gate, up = gate_up[..., ::2], gate_up[..., 1::2]",
        "gate, up = gate_up[..., :64], gate_up[..., 64:]",
    )
    after = run_rewrites(moe_model(halves), "fused-moe")
    assert after.review_messages() == [
        "fused-moe @ MiniExperts.forward: an expert activation whose gate and up rows porter cannot tell "
        "apart is not computed by FusedMoE"
    ]
