"""fuse-qkv: separate q/k/v projections become one QKVParallelLinear, run once and split per rank.

fuse-qkv reads which projections feed the attention core from paged-attention's analysis, so each
test runs paged-attention first.
"""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    init_value,
    method_code,
    replace_class,
    run_rewrites,
    vary,
)


def _fused(source: str = MINI_MODEL):
    return run_rewrites(source, "paged-attention", "fuse-qkv")


def test_three_projections_become_one_qkv_parallel_linear_with_gqa_heads():
    after = _fused()
    assert_code(
        method_code(after.code, "MiniAttention", "__init__").split("self.attn = PagedAttention")[0],
        """
        def __init__(self, config, layer_idx):
            super().__init__()
            self.config = config
            self.layer_idx = layer_idx
            self.head_dim = config.hidden_size // config.num_attention_heads
            self.scaling = self.head_dim**-0.5
            self.attention_dropout = config.attention_dropout
            self.qkv_proj = QKVParallelLinear(
                config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads, bias=False
            )
            self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        """,
    )
    assert ("engine.layers", "QKVParallelLinear") in after.context.plan.engine_imports


def test_forward_runs_the_fused_projection_once_before_the_first_use_and_splits_it():
    after = _fused()
    forward = method_code(after.code, "MiniAttention", "forward")
    assert_code(
        forward.split("        if past_key_values")[0].split("    if past_key_values")[0],
        """
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
            input_shape = hidden_states.shape[:-1]
            hidden_shape = (*input_shape, -1, self.head_dim)
            q, k, v = self.qkv_proj(hidden_states).split(
                [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1
            )
            query_states = q.view(hidden_shape).transpose(1, 2)
            key_states = k.view(hidden_shape).transpose(1, 2)
            value_states = v.view(hidden_shape).transpose(1, 2)
        """,
    )


def test_load_weights_learns_the_checkpoint_names_and_shard_ids():
    assert _fused().context.plan.fused == [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
    ]


def test_piece_names_avoid_names_the_forward_already_uses():
    before = vary(
        MINI_MODEL,
        "        input_shape = hidden_states.shape[:-1]\n",
        "        q = hidden_states.shape[0]\n        input_shape = hidden_states.shape[:-1]\n",
    )
    after = _fused(before)
    code = after.formatted
    assert "        q_, k, v = self.qkv_proj(hidden_states).split(" in code
    assert "        query_states = q_.view(hidden_shape).transpose(1, 2)" in code
    assert "        q = hidden_states.shape[0]" in code


def test_shared_bias_setting_is_carried_over():
    before = vary(
        MINI_MODEL, "self.head_dim, bias=False)", "self.head_dim, bias=config.attention_bias)", count=3
    )
    after = _fused(before)
    assert_code(
        init_value(after.code, "MiniAttention", "qkv_proj"),
        "QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads, "
        "config.num_key_value_heads, bias=config.attention_bias)",
    )
    assert after.review_messages() == []


def test_projections_without_a_bias_argument_fuse_with_bias():
    before = vary(MINI_MODEL, "self.head_dim, bias=False)", "self.head_dim)", count=3)
    assert_code(
        init_value(_fused(before).code, "MiniAttention", "qkv_proj"),
        "QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads, "
        "config.num_key_value_heads, bias=True)",
    )


def test_projections_that_disagree_on_bias_are_a_review_item():
    before = vary(
        MINI_MODEL,
        "self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)",
        "self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=True)",
    )
    messages = set(_fused(before).review_messages())
    assert messages == {
        "fuse-qkv @ MiniAttention.__init__: q/k/v projections disagree on bias: ['False', 'True']"
    }


def test_bias_disagreement_is_flagged_once():
    before = vary(
        MINI_MODEL,
        "self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)",
        "self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=True)",
    )
    assert len(_fused(before).context.review) == 1


def test_an_already_fused_concatenated_projection_becomes_qkv_parallel():
    # GPT-2 style: one Conv1D makes q, k and v.
    before = replace_class(
        MINI_MODEL,
        "MiniAttention",
        """
class MiniAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.split_size = config.hidden_size
        self.c_attn = Conv1D(3 * config.hidden_size, config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask)
        return self.c_proj(attn_output), attn_weights
""",
    )
    after = _fused(before)
    assert init_value(after.code, "MiniAttention", "c_attn") == (
        "QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_heads, "
        "bias=True, checkpoint_layout='concatenated', checkpoint_transposed=True)"
    )
    assert (
        "self.c_attn(hidden_states).split([self.c_attn.q_size, self.c_attn.kv_size, self.c_attn.kv_size], dim=-1)"
        in after.code
    )
    assert after.context.plan.fused == []  # one checkpoint tensor: nothing to map


PHI3_STYLE_ATTENTION = """
class MiniAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        op_size = config.num_attention_heads * self.head_dim + 2 * (config.num_key_value_heads * self.head_dim)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        self.qkv_proj = nn.Linear(config.hidden_size, op_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        qkv = self.qkv_proj(hidden_states)
        query_pos = self.config.num_attention_heads * self.head_dim
        query_states = qkv[..., :query_pos]
        key_states = qkv[..., query_pos : query_pos + self.num_key_value_heads * self.head_dim]
        value_states = qkv[..., query_pos + self.num_key_value_heads * self.head_dim :]
        attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask)
        return self.o_proj(attn_output), attn_weights
"""


def test_slices_of_a_fused_projection_at_global_offsets_become_this_ranks_split():
    # Phi-3: the fused size is a local of __init__, and forward cuts q, k and v by hand.
    after = _fused(replace_class(MINI_MODEL, "MiniAttention", PHI3_STYLE_ATTENTION))
    assert init_value(after.code, "MiniAttention", "qkv_proj") == (
        "QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads, "
        "config.num_key_value_heads, bias=False, checkpoint_layout='concatenated')"
    )
    forward = method_code(after.code, "MiniAttention", "forward")
    assert (
        "query_states, key_states, value_states = qkv.split("
        "[self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)"
    ) in forward.replace("\n", "").replace("    ", "")
    assert "query_pos" not in forward  # the offset's local went with the slices
    assert after.review_messages() == []


def test_slices_that_do_not_tile_the_fused_output_are_a_review_item():
    # k starts one past where q ends: not a q|k|v layout porter can shard, so it must not pass silently.
    before = replace_class(
        MINI_MODEL,
        "MiniAttention",
        PHI3_STYLE_ATTENTION.replace(
            "qkv[..., query_pos : query_pos +", "qkv[..., query_pos + 1 : query_pos +"
        ),
    )
    after = _fused(before)
    assert "qkv[..., :query_pos]" in after.code
    assert after.review_messages() == [
        "fuse-qkv @ MiniAttention.forward: qkv_proj makes q, k and v, cut by slices porter cannot map "
        "to this rank's heads"
    ]


def test_slices_after_a_per_head_view_are_heads_and_stay():
    # GPT-NeoX (4.3x style): `qkv = qkv.view(..., heads, 3 * head_dim)` then `qkv[..., :head_dim]`
    # cuts each head's q|k|v, which a plain column split already shards correctly.
    before = replace_class(
        MINI_MODEL,
        "MiniAttention",
        PHI3_STYLE_ATTENTION.replace(
            "        query_pos = self.config.num_attention_heads * self.head_dim\n",
            "        qkv = qkv.view(qkv.shape[:-1] + (-1, 3 * self.head_dim))\n"
            "        query_pos = self.head_dim\n",
        ),
    )
    after = _fused(before)
    assert "qkv[..., :query_pos]" in after.code
    assert "q_size" not in after.code


def test_projections_reading_different_inputs_are_a_review_item_and_stay_separate():
    source = vary(
        MINI_MODEL,
        "        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "        key_states = self.k_proj(hidden_states * 2).view(hidden_shape).transpose(1, 2)\n",
    )
    after = _fused(source)
    assert (
        "fuse-qkv @ MiniAttention: q, k and v projections read different inputs (hidden_states, "
        "hidden_states * 2); porter fuses them only when they read one tensor" in after.review_messages()
    )
    assert "QKVParallelLinear" not in after.code
    assert "self.k_proj(hidden_states * 2)" in after.code


def test_an_alias_of_the_input_is_the_same_input_and_goes_once_fused():
    source = vary(
        MINI_MODEL,
        "        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n"
        "        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "        current_states = hidden_states\n"
        "        key_states = self.k_proj(current_states).view(hidden_shape).transpose(1, 2)\n"
        "        value_states = self.v_proj(current_states).view(hidden_shape).transpose(1, 2)\n",
    )
    after = _fused(source)
    assert after.review_messages() == []
    forward = method_code(after.code, "MiniAttention", "forward")
    assert "self.qkv_proj(hidden_states)" in forward and "current_states" not in forward
