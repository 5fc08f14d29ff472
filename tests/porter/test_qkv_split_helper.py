"""qkv-split-helper (with fuse-qkv): a fused projection sized per configuration and split into heads
by a helper becomes a QKVParallelLinear whose head counts and checkpoint layout follow the config."""

from __future__ import annotations

from tests.porter.config_variant_model import VARIANT_MODEL
from tests.porter.rewrite_helpers import init_value, method_code, normalize, run_through, vary


def test_head_counts_follow_the_branches_that_size_the_projection():
    after = run_through(VARIANT_MODEL, "fuse-qkv")
    assert normalize(init_value(after.code, "MiniAttention", "query_key_value")) == normalize(
        """
        QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            (config.num_attention_heads if config.grouped else self.num_heads),
            (config.num_kv_heads if config.grouped else 1 if config.multi_query else self.num_heads),
            bias=config.bias,
            checkpoint_layout="grouped",
        )
        """
    )


def test_the_helper_call_becomes_a_split_by_this_ranks_sizes_viewed_into_heads_and_the_helper_goes():
    # The helper returned [.., heads, head_dim] views, so the parts keep a heads axis: a per-head
    # norm or a slice of the head dim after it (Persimmon) sees what it saw in the source.
    after = run_through(VARIANT_MODEL, "prune")
    forward = method_code(after.code, "MiniAttention", "forward")
    code = " ".join(normalize(forward).split())  # layout aside
    assert (
        "query_layer, key_layer, value_layer = ( part.unflatten(-1, (-1, self.head_dim)) for part in "
        "fused_qkv.split( [self.query_key_value.q_size, self.query_key_value.kv_size, "
        "self.query_key_value.kv_size], dim=-1 ) )"
    ) in code
    assert "_split_heads" not in after.code


def test_a_helper_with_only_per_head_views_loads_per_head():
    per_head = vary(
        VARIANT_MODEL,
        "self.num_heads // self.num_kv_heads + 2, self.head_dim",
        "self.num_heads, 3, self.head_dim",
    )
    per_head = vary(
        per_head,
        "fused_qkv.view(batch_size, seq_length, self.num_heads + 2, self.head_dim)",
        "fused_qkv.view(batch_size, seq_length, self.num_heads, 3, self.head_dim)",
    )
    after = run_through(per_head, "fuse-qkv")
    assert 'checkpoint_layout="per_head"' in normalize(
        init_value(after.code, "MiniAttention", "query_key_value")
    )


def test_a_view_porter_cannot_read_is_a_review_item():
    odd = vary(VARIANT_MODEL, "self.num_heads + 2, self.head_dim)", "self.num_heads + 1, self.head_dim)")
    after = run_through(odd, "qkv-split-helper")
    assert after.review_messages() == [
        "qkv-split-helper @ MiniAttention._split_heads: splits the fused q|k|v in a layout porter cannot read"
    ]
