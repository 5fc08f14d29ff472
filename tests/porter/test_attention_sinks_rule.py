"""attention-sinks: a learned logit the core puts in each head's softmax denominator becomes
PagedAttention(sinks=...); other learned state read by the core still stops the port."""

from __future__ import annotations

from porter.analysis.unsupported import find_unsupported
from tests.porter.rewrite_helpers import MINI_MODEL, init_value, make_context, run_through, vary

SINK_PARAMETER = (
    "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
    "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
    "        self.sinks = nn.Parameter(torch.empty(config.num_attention_heads))\n",
)
SOFTMAX = "    attn_weights = nn.functional.softmax(attn_weights, dim=-1)\n"
EXTRA_COLUMN = (
    "    sinks = module.sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)\n"
    "    combined_logits = torch.cat([attn_weights, sinks], dim=-1)\n"
    "    probs = nn.functional.softmax(combined_logits, dim=-1)\n"
    "    attn_weights = probs[..., :-1]\n"
)
LSE_SCALE = (
    "    lse = torch.logsumexp(attn_weights, dim=-1)\n"
    "    sink_scale = (lse - module.sinks.view(1, -1, 1)).sigmoid()\n"
    "    attn_weights = nn.functional.softmax(attn_weights, dim=-1)\n"
)


def with_core(core_lines: str, after_output: str = "") -> str:
    source = vary(vary(MINI_MODEL, *SINK_PARAMETER), SOFTMAX, core_lines)
    if after_output:
        source = vary(
            source,
            "    attn_output = attn_output.transpose(1, 2).contiguous()\n",
            after_output + "    attn_output = attn_output.transpose(1, 2).contiguous()\n",
        )
    return source


def stops(source: str) -> list[str]:
    tree, context = make_context(source)
    return [found.construct for found in find_unsupported(tree, set(context.index.reachable))]


def test_sink_as_an_extra_score_column_becomes_paged_attention_sinks():
    source = with_core(EXTRA_COLUMN)
    assert stops(source) == []
    after = run_through(source, "attention-sinks")
    assert init_value(after.code, "MiniAttention", "attn").endswith("sinks=self.sinks)")
    assert (
        init_value(after.code, "MiniAttention", "sinks")
        == "nn.Parameter(torch.empty(config.num_attention_heads))"
    )


def test_sink_as_a_sigmoid_of_logsumexp_rescaling_becomes_paged_attention_sinks():
    source = with_core(LSE_SCALE, "    attn_output = attn_output * sink_scale.unsqueeze(-1)\n")
    assert stops(source) == []
    after = run_through(source, "attention-sinks")
    assert init_value(after.code, "MiniAttention", "attn").endswith("sinks=self.sinks)")


def test_other_learned_state_in_the_core_still_stops_the_port():
    source = with_core(SOFTMAX, "    attn_output = attn_output * module.sinks.view(1, -1, 1, 1)\n")
    assert stops(source) == ["an attention core with learned state of its own (`module.sinks`)"]
