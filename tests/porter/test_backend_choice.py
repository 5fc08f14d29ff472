"""decide-conditions: a choice of HF attention backend (`config._attn_implementation`) keeps the eager
path, where the attention math is written out for porter to read."""

from __future__ import annotations

from tests.porter.config_variant_model import VARIANT_MODEL
from tests.porter.rewrite_helpers import method_code, run_rewrites, vary

DECIDE = ("class-table", "plain-linear", "conditional-inputs", "decide-conditions")


def test_an_sdpa_test_is_false_and_the_eager_core_stays():
    forward = method_code(run_rewrites(VARIANT_MODEL, *DECIDE).code, "MiniAttention", "forward")
    assert "scaled_dot_product_attention" not in forward
    assert "_attn_implementation" not in forward
    assert "scores = query_layer @ key_layer.transpose(-1, -2)" in forward


def test_a_not_eager_test_is_false_too():
    source = vary(
        VARIANT_MODEL,
        'if self.config._attn_implementation == "sdpa":',
        'if self.config._attn_implementation != "eager":',
    )
    forward = method_code(run_rewrites(source, *DECIDE).code, "MiniAttention", "forward")
    assert "scaled_dot_product_attention" not in forward
    assert "probs @ value_layer" in forward


def test_an_eager_test_is_true():
    source = vary(
        VARIANT_MODEL,
        'if self.config._attn_implementation == "sdpa":',
        'if self.config._attn_implementation == "eager":',
    )
    forward = method_code(run_rewrites(source, *DECIDE).code, "MiniAttention", "forward")
    assert "scaled_dot_product_attention" in forward
    assert "F.softmax(scores + attention_mask" not in forward  # the first path's eager core went
    assert forward.count("F.softmax(") == 1  # the ALiBi path's core is all that is left
