"""strip-training: dropout is the identity at inference, and rates nothing reads any more go."""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    class_code,
    function_code,
    method_code,
    replace_class,
    run_rewrites,
    vary,
)


def _mlp(init_extra: str, forward_body: str) -> str:
    """MINI_MODEL with a two-Linear MLP whose __init__ adds `init_extra` and whose forward is `forward_body`."""
    return replace_class(
        MINI_MODEL,
        "MiniMLP",
        f"""
class MiniMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
{init_extra}
    def forward(self, x):
{forward_body}
""",
    )


def test_functional_dropout_becomes_its_input_and_the_self_assignment_goes():
    after = run_rewrites(MINI_MODEL, "strip-training")
    assert_code(
        function_code(after.code, "eager_attention_forward"),
        """
        def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
            if attention_mask is not None:
                attn_weights = attn_weights + attention_mask
            attn_weights = nn.functional.softmax(attn_weights, dim=-1)
            attn_output = torch.matmul(attn_weights, value)
            attn_output = attn_output.transpose(1, 2).contiguous()
            return attn_output, attn_weights
        """,
    )


def test_dropout_module_call_becomes_its_input_and_the_module_goes():
    before = _mlp(
        "        self.dropout = nn.Dropout(config.resid_pdrop)\n",
        "        return self.dropout(self.down_proj(self.up_proj(x)))\n",
    )
    after = run_rewrites(before, "strip-training")
    assert_code(
        class_code(after.code, "MiniMLP"),
        """
        class MiniMLP(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
                self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

            def forward(self, x):
                return self.down_proj(self.up_proj(x))
        """,
    )


def test_dropout_rate_attribute_goes_once_its_dropout_call_is_gone():
    before = _mlp(
        "        self.activation_dropout = config.activation_dropout\n",
        "        h = self.up_proj(x)\n"
        "        h = nn.functional.dropout(h, p=self.activation_dropout, training=self.training)\n"
        "        return self.down_proj(h)\n",
    )
    after = run_rewrites(before, "strip-training")
    assert_code(
        class_code(after.code, "MiniMLP"),
        """
        class MiniMLP(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
                self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)

            def forward(self, x):
                h = self.up_proj(x)
                return self.down_proj(h)
        """,
    )


def test_not_training_conditional_keeps_its_inference_value():
    after = run_rewrites(MINI_MODEL, "strip-training")
    assert "            dropout=0.0,\n" in after.formatted
    # ...and with it the rate attribute nothing reads any more.
    assert "attention_dropout" not in method_code(after.code, "MiniAttention", "__init__")


def test_training_conditional_keeps_its_else_value():
    before = _mlp(
        "", "        h = self.up_proj(x)\n        return self.down_proj(h * 2 if self.training else h)\n"
    )
    after = run_rewrites(before, "strip-training")
    assert_code(
        method_code(after.code, "MiniMLP", "forward"),
        """
        def forward(self, x):
            h = self.up_proj(x)
            return self.down_proj(h)
        """,
    )


def test_layerdrop_rate_goes_after_dead_code_removed_its_training_branch():
    before = _mlp(
        "        self.layerdrop = config.layerdrop\n",
        "        if self.training:\n"
        "            if torch.rand([]) < self.layerdrop:\n"
        "                return x\n"
        "        return self.down_proj(self.up_proj(x))\n",
    )
    after = run_rewrites(before, "dead-code", "strip-training")
    assert "layerdrop" not in class_code(after.code, "MiniMLP")


def test_training_only_rate_that_is_still_read_stays():
    before = _mlp(
        "        self.hidden_dropout = config.hidden_dropout\n",
        "        scale = 1.0 - self.hidden_dropout\n        return self.down_proj(self.up_proj(x)) * scale\n",
    )
    after = run_rewrites(before, "strip-training")
    assert "self.hidden_dropout = config.hidden_dropout" in method_code(after.code, "MiniMLP", "__init__")


def test_unread_attribute_that_is_not_a_training_rate_stays():
    before = _mlp(
        "        self.padding_idx = config.pad_token_id\n", "        return self.down_proj(self.up_proj(x))\n"
    )
    after = run_rewrites(before, "strip-training")
    assert "self.padding_idx = config.pad_token_id" in method_code(after.code, "MiniMLP", "__init__")


def test_a_module_attribute_named_like_dropout_but_not_one_is_called_as_before():
    before = vary(
        MINI_MODEL,
        "        self.act_fn = ACT2FN[config.hidden_act]\n",
        "        self.act_fn = ACT2FN[config.hidden_act]\n        self.drop = nn.LayerNorm(config.intermediate_size)\n",
    )
    before = vary(before, "self.act_fn(self.gate_proj(x))", "self.drop(self.act_fn(self.gate_proj(x)))")
    after = run_rewrites(before, "strip-training")
    assert "self.drop(self.act_fn(self.gate_proj(x)))" in method_code(after.code, "MiniMLP", "forward")


def test_a_constructor_rate_parameter_nothing_reads_goes_with_its_keyword_argument():
    # BioGPT's attention: `dropout: float = 0.0`, stored as `self.dropout`, read only by dropout calls.
    before = vary(
        MINI_MODEL,
        "    def __init__(self, config, layer_idx):\n        super().__init__()\n        self.config = config",
        "    def __init__(self, config, layer_idx, dropout: float = 0.0):\n"
        "        super().__init__()\n        self.dropout = dropout\n        self.config = config",
    )
    before = vary(
        before,
        "self.self_attn = MiniAttention(config, layer_idx)",
        "self.self_attn = MiniAttention(config, layer_idx, dropout=config.attention_dropout)",
    )
    after = run_rewrites(before, "strip-training")
    assert "def __init__(self, config, layer_idx):" in class_code(after.code, "MiniAttention")
    assert "MiniAttention(config, layer_idx)" in class_code(after.code, "MiniDecoderLayer")


def test_a_rate_parameter_passed_by_position_stays():
    before = vary(
        MINI_MODEL,
        "    def __init__(self, config, layer_idx):\n        super().__init__()\n        self.config = config",
        "    def __init__(self, config, layer_idx, dropout=0.0):\n"
        "        super().__init__()\n        self.config = config",
    )
    before = vary(
        before,
        "self.self_attn = MiniAttention(config, layer_idx)",
        "self.self_attn = MiniAttention(config, layer_idx, 0.1)",
    )
    after = run_rewrites(before, "strip-training")
    assert "dropout=0.0" in class_code(after.code, "MiniAttention")
    assert "MiniAttention(config, layer_idx, 0.1)" in class_code(after.code, "MiniDecoderLayer")
