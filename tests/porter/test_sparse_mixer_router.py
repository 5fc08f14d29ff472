"""A router written as a Linear subclass calling a routing helper told `training=self.training`
(PhiMoE's PhimoeTopKRouter and sparsemixer): the helper runs its inference branches, the router is
kept whole on every rank, and it is not mistaken for attention for the softmax in its helper."""

from __future__ import annotations

from porter.analysis.model_index import build_index
from tests.porter.rewrite_helpers import assert_code, function_code, method_code, run_rewrites, vary
from tests.porter.test_fused_moe import BLOCK, EXPERTS, moe_model

# transformers 5.17's sparsemixer, shortened to its first expert; PhimoeTopKRouter with the
# mini model's config names.
SPARSE_MIXER = '''
def sparsemixer(scores, jitter_eps, training, top_k=2):
    """Top-2 by a masked softmax."""
    with torch.no_grad():
        mask_logits_threshold, max_ind = scores.max(dim=-1, keepdim=True)
        factor = scores.abs().clamp(min=mask_logits_threshold)
        mask_logits_threshold = ((mask_logits_threshold - scores) / factor) > (2 * jitter_eps)
    masked_gates = scores.masked_fill(mask_logits_threshold, float("-inf"))
    if training:
        selected_experts = (masked_gates - torch.empty_like(masked_gates).exponential_().log()).max(dim=-1)[1]
    else:
        selected_experts = max_ind
    masked_gates = torch.softmax(masked_gates, dim=-1)
    multiplier_o = masked_gates.gather(dim=-1, index=selected_experts)
    if training:
        multiplier = MiniMultiplier.apply(scores, multiplier_o, selected_experts, masked_gates)
    else:
        multiplier = multiplier_o
    return multiplier, selected_experts


class MiniMultiplier(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, multiplier, selected_experts, masked_gates):
        ctx.save_for_backward(multiplier, selected_experts, masked_gates)
        return multiplier


class MiniRouter(nn.Linear):
    def __init__(self, config):
        super().__init__(config.hidden_size, config.num_local_experts, bias=False)
        self.router_jitter_noise = config.router_jitter_noise
        self.top_k = config.num_experts_per_tok

    def forward(self, hidden_states):
        router_logits = super().forward(hidden_states)
        routing_weights, selected_experts = sparsemixer(
            router_logits, jitter_eps=self.router_jitter_noise, training=self.training, top_k=self.top_k
        )
        return routing_weights, selected_experts


'''


def sparse_mixer_model() -> str:
    experts = EXPERTS[: EXPERTS.index("class MiniRouter")] + SPARSE_MIXER.lstrip()
    return moe_model(experts)


def test_the_helper_runs_its_inference_branches_and_loses_the_flag():
    after = run_rewrites(sparse_mixer_model(), "training-arguments")
    assert_code(
        function_code(after.code, "sparsemixer"),
        '''
        def sparsemixer(scores, jitter_eps, top_k=2):
            """Top-2 by a masked softmax."""
            with torch.no_grad():
                mask_logits_threshold, max_ind = scores.max(dim=-1, keepdim=True)
                factor = scores.abs().clamp(min=mask_logits_threshold)
                mask_logits_threshold = ((mask_logits_threshold - scores) / factor) > (2 * jitter_eps)
            masked_gates = scores.masked_fill(mask_logits_threshold, float("-inf"))
            selected_experts = max_ind
            masked_gates = torch.softmax(masked_gates, dim=-1)
            multiplier_o = masked_gates.gather(dim=-1, index=selected_experts)
            multiplier = multiplier_o
            return multiplier, selected_experts
        ''',
    )
    assert_code(
        method_code(after.code, "MiniRouter", "forward"),
        """
        def forward(self, hidden_states):
            router_logits = super().forward(hidden_states)
            routing_weights, selected_experts = sparsemixer(
                router_logits, jitter_eps=self.router_jitter_noise, top_k=self.top_k
            )
            return routing_weights, selected_experts
        """,
    )


def test_a_helper_some_caller_tells_something_else_keeps_its_flag():
    other = vary(sparse_mixer_model(), "training=self.training", "training=self.jitter_in_eval")
    after = run_rewrites(other, "training-arguments")
    assert "def sparsemixer(scores, jitter_eps, training, top_k=2):" in after.code
    assert after.changes("training-arguments") == []


def test_the_router_is_no_attention_and_no_review_item():
    index = build_index(__import__("libcst").parse_module(sparse_mixer_model()))
    assert "MiniRouter" not in index.attention
    after = run_rewrites(sparse_mixer_model(), "plain-linear")
    assert after.review_messages() == []
    assert "class MiniRouter(nn.Linear):" in after.code


def test_a_linear_subclass_that_routes_nothing_is_still_a_review_item():
    block = vary(
        BLOCK,
        "self.gate = MiniRouter(config)",
        "self.gate = MiniRouter(config)\n        self.extra = MiniScaled(config)",
    )
    scaled = (
        "class MiniScaled(nn.Linear):\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config.hidden_size, config.hidden_size)\n\n"
        "    def forward(self, x):\n"
        "        return super().forward(x) * 2\n\n\n"
    )
    source = moe_model(EXPERTS[: EXPERTS.index("class MiniRouter")] + scaled + SPARSE_MIXER.lstrip())
    source = source.replace(BLOCK.strip(), block.strip())
    after = run_rewrites(source, "plain-linear")
    assert after.review_messages() == [
        "plain-linear @ MiniMLP.__init__: MiniScaled subclasses a Linear with its own forward"
    ]
