"""conditional-inputs: `if alibi is None:` where the backbone builds `alibi` only under a config flag
becomes a test of that flag, so both paths survive and the paged attention's ALiBi follows the flag."""

from __future__ import annotations

from tests.porter.config_variant_model import VARIANT_MODEL
from tests.porter.rewrite_helpers import init_value, method_code, normalize, run_rewrites, run_through, vary

UP_TO_PAGED = ("class-table", "plain-linear", "conditional-inputs", "decide-conditions", "paged-attention")


def test_a_presence_test_of_a_flag_built_input_becomes_a_test_of_the_flag():
    after = run_rewrites(VARIANT_MODEL, "conditional-inputs")
    assert after.changes("conditional-inputs") == ["alibi is None -> not self.config.alibi"]
    assert "    if not self.config.alibi:\n" in method_code(after.code, "MiniAttention", "forward")


def test_a_bias_the_backbone_always_builds_is_present_and_only_its_path_stays():
    """The engine drops the bias input but applies ALiBi itself, so `alibi is None` is false where
    the backbone always builds it (taking every dropped input for None would keep the path without
    the bias, which HF never runs here)."""
    always = vary(
        VARIANT_MODEL,
        "        if self.use_alibi:\n            alibi = build_alibi(",
        "        if True:\n            alibi = build_alibi(",
    )
    after = run_rewrites(always, "class-table", "plain-linear", "conditional-inputs", "decide-conditions")
    assert after.changes("conditional-inputs") == []
    forward = method_code(after.code, "MiniAttention", "forward")
    assert "logits = scores + alibi" in forward
    assert "scaled_dot_product_attention" not in forward and "alibi is None" not in forward


def test_paged_attention_gets_the_scale_per_path_and_alibi_slopes_under_the_flag():
    after = run_rewrites(VARIANT_MODEL, *UP_TO_PAGED)
    assert normalize(init_value(after.code, "MiniAttention", "attn")) == normalize(
        """
        PagedAttention(
            (config.num_attention_heads if config.grouped else self.num_heads),
            self.head_dim,
            scale=(1 / (math.sqrt(self.head_dim)) if not self.config.alibi else self.inv_norm_factor),
            alibi_slopes=build_alibi_slopes((config.num_attention_heads if config.grouped else self.num_heads))
            * self.inv_norm_factor
            if self.config.alibi
            else None,
            num_kv_heads=(config.num_kv_heads if config.grouped else 1 if config.multi_query else self.num_heads),
        )
        """
    )


def test_each_path_core_becomes_the_paged_call_and_the_head_transposes_go():
    forward = normalize(
        method_code(run_rewrites(VARIANT_MODEL, *UP_TO_PAGED).code, "MiniAttention", "forward")
    )
    assert (
        forward.count(
            "attn_output = self.attn(query_layer, key_layer, value_layer, kv_cache, input_metadata).flatten(1)"
        )
        == 2
    )
    for gone in ("transpose(1, 2)", "softmax", "@", "scaled_dot_product_attention"):
        assert gone not in forward


def test_paths_left_identical_merge_into_one():
    forward = method_code(run_through(VARIANT_MODEL, "dead-code").code, "MiniAttention", "forward")
    assert "if " not in forward
    assert forward.count("self.attn(") == 1


def test_the_backbone_building_the_dropped_input_loses_the_whole_if():
    forward = method_code(run_through(VARIANT_MODEL, "dead-code").code, "MiniModel", "forward")
    assert "use_alibi" not in forward
    assert "alibi" not in forward
