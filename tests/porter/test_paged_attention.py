"""paged-attention: the attention core becomes one PagedAttention call, built from what the core was given."""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    method_code,
    normalize,
    replace_class,
    run_rewrites,
    vary,
)

# OPT-style attention: square projections, head count named by `head_dim = embed_dim // num_heads`,
# and an old-style eager core method (a softmax over scores) instead of the attention interface.
OLD_STYLE_ATTENTION = """
class MiniAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _attn(self, query, key, value, attention_mask=None):
        weights = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)
        weights = nn.functional.softmax(weights, dim=-1)
        return torch.matmul(weights, value), weights

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        query = self.q_proj(hidden_states)
        key = self.k_proj(hidden_states)
        value = self.v_proj(hidden_states)
        attn_output, attn_weights = self._attn(query, key, value, attention_mask)
        return self.out_proj(attn_output), attn_weights
"""


def test_attention_interface_call_becomes_paged_attention_and_the_lookup_goes():
    after = run_rewrites(MINI_MODEL, "paged-attention")
    assert_code(
        method_code(after.code, "MiniAttention", "forward"),
        """
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
            input_shape = hidden_states.shape[:-1]
            hidden_shape = (*input_shape, -1, self.head_dim)
            query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
            if past_key_values is not None:
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata)
            attn_output = attn_output.reshape(*input_shape, -1).contiguous()
            attn_output = self.o_proj(attn_output)
            return attn_output, attn_weights
        """,
    )
    assert ("engine.layers", "PagedAttention") in after.context.plan.engine_imports


def test_init_gains_paged_attention_with_gqa_heads_and_the_scale():
    after = run_rewrites(MINI_MODEL, "paged-attention")
    init = method_code(after.code, "MiniAttention", "__init__")
    assert_code(
        init.split("self.o_proj")[1].split("\n", 1)[1],
        """
        self.attn = PagedAttention(
            config.num_attention_heads, self.head_dim, scale=self.scaling, num_kv_heads=config.num_key_value_heads
        )
        """,
    )


def test_multi_head_attention_passes_no_kv_head_count():
    before = vary(
        MINI_MODEL,
        "config.num_key_value_heads * self.head_dim",
        "config.num_attention_heads * self.head_dim",
        count=2,
    )
    after = run_rewrites(before, "paged-attention")
    assert (
        "self.attn = PagedAttention(config.num_attention_heads, self.head_dim, scale=self.scaling)"
        in after.formatted
    )


def test_sliding_window_and_soft_cap_become_constructor_arguments():
    before = vary(
        MINI_MODEL,
        "            scaling=self.scaling,\n",
        "            scaling=self.scaling,\n"
        "            sliding_window=self.sliding_window,\n"
        "            softcap=self.config.attn_logit_softcapping,\n",
    )
    after = run_rewrites(before, "paged-attention")
    assert_code(
        method_code(after.code, "MiniAttention", "__init__").split("self.o_proj")[1].split("\n", 1)[1],
        """
        self.attn = PagedAttention(
            config.num_attention_heads,
            self.head_dim,
            scale=self.scaling,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.config.attn_logit_softcapping,
            num_kv_heads=config.num_key_value_heads,
        )
        """,
    )
    assert after.review_messages() == []


def test_missing_scaling_defaults_to_inverse_square_root_of_head_dim():
    before = vary(MINI_MODEL, "            scaling=self.scaling,\n", "")
    after = run_rewrites(before, "paged-attention")
    assert "scale=self.head_dim**-0.5" in normalize(after.code)


def test_a_scale_computed_in_forward_is_a_review_item():
    before = vary(MINI_MODEL, "            scaling=self.scaling,\n", "            scaling=scale,\n")
    before = vary(
        before,
        "        attention_interface = ALL",
        "        scale = self.head_dim**-0.5\n        attention_interface = ALL",
    )
    after = run_rewrites(before, "paged-attention")
    assert after.review_messages() == [
        "paged-attention @ MiniAttention.__init__: attention argument `scale` is computed in forward"
    ]


def test_old_style_eager_core_method_is_replaced_and_heads_come_from_head_dim_definition():
    before = replace_class(MINI_MODEL, "MiniAttention", OLD_STYLE_ATTENTION)
    after = run_rewrites(before, "paged-attention")
    assert_code(
        method_code(after.code, "MiniAttention", "forward"),
        """
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            query = self.q_proj(hidden_states)
            key = self.k_proj(hidden_states)
            value = self.v_proj(hidden_states)
            attn_output = self.attn(query, key, value, kv_cache, input_metadata)
            return self.out_proj(attn_output), attn_weights
        """,
    )
    # the scale is the one the core method applies, read from its body
    assert (
        "self.attn = PagedAttention(self.num_heads, self.head_dim, scale=1 / (math.sqrt(self.head_dim)))"
        in normalize(after.code)
    )


def test_a_core_method_that_does_not_scale_its_scores_gets_scale_one():
    # GPT-Neo's `_attn` multiplies q by k^T and takes the softmax as it is: the default
    # head_dim ** -0.5 made its port wrong (relative error 1.06 in verify).
    before = replace_class(
        MINI_MODEL,
        "MiniAttention",
        OLD_STYLE_ATTENTION.replace(" / math.sqrt(self.head_dim)", ""),
    )
    after = run_rewrites(before, "paged-attention")
    assert "self.attn = PagedAttention(self.num_heads, self.head_dim, scale=1.0)" in normalize(after.code)


def test_a_scale_applied_in_its_own_statement_is_read_too():
    # GPT-J: `attn_weights = attn_weights / self.scale_attn` after the product
    before = replace_class(
        MINI_MODEL,
        "MiniAttention",
        OLD_STYLE_ATTENTION.replace(
            "        weights = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(self.head_dim)\n",
            "        weights = torch.matmul(query, key.transpose(-1, -2))\n"
            "        weights = weights / self.scale_attn\n",
        ),
    )
    after = run_rewrites(before, "paged-attention")
    assert "scale=1 / (self.scale_attn))" in normalize(after.code)


def test_a_scale_the_core_function_takes_as_an_argument_is_read_from_the_call():
    before = replace_class(
        MINI_MODEL,
        "MiniAttention",
        OLD_STYLE_ATTENTION.replace(
            "def _attn(self, query, key, value, attention_mask=None):",
            "def _attn(self, query, key, value, attention_mask=None, temperature=1.0):",
        )
        .replace("/ math.sqrt(self.head_dim)", "/ temperature")
        .replace(
            "self._attn(query, key, value, attention_mask)",
            "self._attn(query, key, value, attention_mask, self.norm_factor)",
        ),
    )
    after = run_rewrites(before, "paged-attention")
    assert (
        "self.attn = PagedAttention(self.num_heads, self.head_dim, scale=1 / self.norm_factor)"
        in normalize(after.code)
    )


def test_a_local_window_cut_into_the_causal_mask_buffer_becomes_the_sliding_window():
    # GPT-Neo: `bias ^ tril(bias, -window_size)` on local layers; ignoring it passed verify only
    # because the prompts were shorter than the window.
    before = replace_class(
        MINI_MODEL,
        "MiniAttention",
        OLD_STYLE_ATTENTION.replace(
            "    def __init__(self, config, layer_idx):\n        super().__init__()\n",
            "    def __init__(self, config, layer_idx, attention_type):\n        super().__init__()\n"
            "        bias = torch.tril(torch.ones((8, 8), dtype=bool))\n"
            '        if attention_type == "local":\n'
            "            bias = torch.bitwise_xor(bias, torch.tril(bias, -config.window_size))\n"
            "        self.bias = nn.Buffer(bias, persistent=False)\n",
        ),
    )
    after = run_rewrites(before, "paged-attention")
    assert 'sliding_window=config.window_size if attention_type == "local" else None' in normalize(after.code)


def test_attention_it_cannot_trace_is_a_review_item_and_left_alone():
    # No attribute names the head size, so the head count cannot be read from the projections.
    before = vary(MINI_MODEL, "self.head_dim", "self.dim_per_head", count=7)
    after = run_rewrites(before, "paged-attention")
    assert after.review_messages() == [
        "paged-attention @ MiniAttention: could not trace q/k/v projections and head size into the attention core"
    ]
    assert "PagedAttention" not in after.formatted
    assert "attention_interface(" in after.formatted
