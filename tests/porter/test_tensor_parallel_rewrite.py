"""tensor-parallel: each Linear's sharding is read from the data flow of forward; vocab embeddings go parallel.

(Named apart from tests/engine/layers/test_tensor_parallel.py: test modules share one namespace.)
"""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    init_value,
    replace_class,
    run_rewrites,
    vary,
)


def _kinds(code: str, class_name: str, *attributes: str) -> dict[str, str]:
    """The layer class each attribute's Linear became."""
    return {a: init_value(code, class_name, a).split("(", 1)[0] for a in attributes}


def _mlp(forward_body: str, extra_init: str = "") -> str:
    return replace_class(
        MINI_MODEL,
        "MiniMLP",
        f"""
class MiniMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
{extra_init}
    def forward(self, x):
{forward_body}
""",
    )


def test_gated_mlp_inputs_are_column_parallel_and_the_output_row_parallel():
    after = run_rewrites(MINI_MODEL, "tensor-parallel")
    assert _kinds(after.code, "MiniMLP", "gate_proj", "up_proj", "down_proj") == {
        "gate_proj": "ColumnParallelLinear",
        "up_proj": "ColumnParallelLinear",
        "down_proj": "RowParallelLinear",
    }
    assert (
        init_value(after.code, "MiniMLP", "down_proj")
        == "RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False)"
    )


def test_data_flow_through_statements_and_an_activation_module():
    before = _mlp(
        "        h = self.up_proj(x)\n        h = self.act(h)\n        return self.down_proj(h)\n",
        extra_init="        self.act = nn.GELU()\n",
    )
    after = run_rewrites(before, "tensor-parallel")
    assert _kinds(after.code, "MiniMLP", "up_proj", "down_proj") == {
        "up_proj": "ColumnParallelLinear",
        "down_proj": "RowParallelLinear",
    }


def test_a_norm_between_the_pair_keeps_both_replicated():
    before = _mlp(
        "        return self.down_proj(self.norm(self.up_proj(x)))\n",
        extra_init="        self.norm = nn.LayerNorm(config.intermediate_size)\n",
    )
    after = run_rewrites(before, "tensor-parallel")
    assert _kinds(after.code, "MiniMLP", "up_proj", "down_proj") == {
        "up_proj": "ReplicatedLinear",
        "down_proj": "ReplicatedLinear",
    }


def test_a_residual_add_of_the_sharded_output_keeps_both_replicated():
    before = _mlp(
        "        h = self.up_proj(x)\n        h = h + x\n        return self.down_proj(self.act_fn(h))\n"
    )
    after = run_rewrites(before, "tensor-parallel")
    assert _kinds(after.code, "MiniMLP", "up_proj", "down_proj") == {
        "up_proj": "ReplicatedLinear",
        "down_proj": "ReplicatedLinear",
    }


def test_a_projection_whose_output_is_also_returned_keeps_the_pair_replicated():
    before = _mlp("        h = self.up_proj(x)\n        return self.down_proj(self.act_fn(h)), h\n")
    after = run_rewrites(before, "tensor-parallel")
    assert _kinds(after.code, "MiniMLP", "up_proj", "down_proj") == {
        "up_proj": "ReplicatedLinear",
        "down_proj": "ReplicatedLinear",
    }


def test_conv1d_swaps_its_sizes_and_says_its_weight_is_transposed():
    before = replace_class(
        MINI_MODEL,
        "MiniMLP",
        """
class MiniMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Conv1D(config.intermediate_size, config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))
""",
    )
    after = run_rewrites(before, "tensor-parallel")
    assert_code(
        init_value(after.code, "MiniMLP", "c_fc"),
        "ColumnParallelLinear(config.hidden_size, config.intermediate_size, checkpoint_transposed=True)",
    )
    assert_code(
        init_value(after.code, "MiniMLP", "c_proj"),
        "RowParallelLinear(config.intermediate_size, config.hidden_size, checkpoint_transposed=True)",
    )


def test_attention_output_projection_after_paged_attention_is_row_parallel():
    after = run_rewrites(MINI_MODEL, "paged-attention", "fuse-qkv", "tensor-parallel")
    assert _kinds(after.code, "MiniAttention", "o_proj") == {"o_proj": "RowParallelLinear"}


def test_attention_projections_around_an_unported_core_stay_replicated():
    after = run_rewrites(MINI_MODEL, "tensor-parallel")
    assert set(_kinds(after.code, "MiniAttention", "q_proj", "k_proj", "v_proj", "o_proj").values()) == {
        "ReplicatedLinear"
    }


def test_vocab_embedding_becomes_vocab_parallel_and_other_embeddings_stay():
    before = vary(
        MINI_MODEL,
        "        self.norm = nn.LayerNorm(config.hidden_size)\n        self.gradient_checkpointing",
        "        self.norm = nn.LayerNorm(config.hidden_size)\n"
        "        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)\n"
        "        self.gradient_checkpointing",
    )
    after = run_rewrites(before, "tensor-parallel")
    assert init_value(after.code, "MiniModel", "embed_tokens") == (
        "VocabParallelEmbedding(config.vocab_size, config.hidden_size)"
    )
    assert init_value(after.code, "MiniModel", "embed_positions") == (
        "nn.Embedding(config.max_position_embeddings, config.hidden_size)"
    )


def test_engine_layers_used_are_requested_for_import():
    after = run_rewrites(MINI_MODEL, "tensor-parallel")
    assert {
        ("engine.layers", "ColumnParallelLinear"),
        ("engine.layers", "RowParallelLinear"),
        ("engine.layers", "ReplicatedLinear"),
        ("engine.layers", "VocabParallelEmbedding"),
    } <= after.context.plan.engine_imports


def test_a_linear_after_an_attention_submodule_named_attn_stays_replicated():
    before = MINI_MODEL.replace("self.self_attn", "self.attn")
    before = vary(
        before,
        "        self.input_layernorm = nn.LayerNorm(config.hidden_size)\n",
        "        self.input_layernorm = nn.LayerNorm(config.hidden_size)\n"
        "        self.attn_out = nn.Linear(config.hidden_size, config.hidden_size)\n",
    )
    before = vary(
        before,
        "        hidden_states = residual + hidden_states\n        residual = hidden_states\n",
        "        hidden_states = residual + self.attn_out(hidden_states)\n        residual = hidden_states\n",
    )
    after = run_rewrites(before, "tensor-parallel")
    assert _kinds(after.code, "MiniDecoderLayer", "attn_out") == {"attn_out": "ReplicatedLinear"}


def test_a_projection_whose_output_is_chunked_shards_each_part_on_its_own():
    # GLM's gate_up_proj: one Linear, its output cut in two. A plain column split would hand one
    # rank the whole gate and the other the whole up.
    before = replace_class(
        MINI_MODEL,
        "MiniMLP",
        """
class MiniMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        up_states = self.gate_up_proj(x)
        gate, up_states = up_states.chunk(2, dim=-1)
        return self.down_proj(up_states * self.act_fn(gate))
""",
    )
    after = run_rewrites(before, "tensor-parallel")
    assert init_value(after.code, "MiniMLP", "gate_up_proj") == (
        "MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False)"
    )
    assert init_value(after.code, "MiniMLP", "down_proj").startswith("RowParallelLinear(")


def test_a_chunk_of_an_output_size_that_is_no_multiple_literal_divides_it():
    before = replace_class(
        MINI_MODEL,
        "MiniMLP",
        """
class MiniMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size // 2, config.hidden_size, bias=False)

    def forward(self, x):
        a, b = self.in_proj(x).chunk(2, dim=-1)
        return self.down_proj(a * b)
""",
    )
    after = run_rewrites(before, "tensor-parallel")
    assert init_value(after.code, "MiniMLP", "in_proj") == (
        "MergedColumnParallelLinear(config.hidden_size, [(config.intermediate_size) // 2] * 2, bias=False)"
    )


def _attention_output_through(statement: str, extra_init: str = "") -> str:
    """MINI_MODEL with `statement` between the attention core's output and o_proj."""
    before = vary(
        MINI_MODEL,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        + extra_init,
    )
    return vary(
        before,
        "        attn_output = self.o_proj(attn_output)\n",
        f"        {statement}\n        attn_output = self.o_proj(attn_output)\n",
    )


def _review(source: str) -> list[str]:
    after = run_rewrites(source, "paged-attention", "fuse-qkv", "tensor-parallel")
    return [f"{item.rule} {item.where}: {item.message}" for item in after.context.review]


def test_a_split_attention_output_into_a_module_that_needs_it_whole_is_flagged():
    # A LayerNorm over the full width on the attention output: each rank holds only its heads of
    # it, so at tp > 1 the norm would get a tensor of the wrong width. Nothing can keep it whole.
    items = _review(
        _attention_output_through(
            "attn_output = self.out_norm(attn_output)",
            "        self.out_norm = nn.LayerNorm(config.hidden_size)\n",
        )
    )
    assert len(items) == 1
    assert items[0].startswith("tensor-parallel MiniAttention.forward: `self.out_norm(attn_output)`")
    assert "split across ranks by self.attn" in items[0]


def test_a_split_attention_output_added_to_a_whole_tensor_is_flagged():
    items = _review(_attention_output_through("attn_output = attn_output + hidden_states"))
    assert len(items) == 1
    assert "`attn_output + hidden_states`: a split tensor meets a whole one" in items[0]


def test_the_plain_attention_block_and_a_one_head_wide_norm_are_not_flagged():
    assert _review(MINI_MODEL) == []
    per_head = vary(
        MINI_MODEL,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        "        self.q_norm = nn.LayerNorm(config.hidden_size // config.num_attention_heads)\n",
    )
    per_head = vary(
        per_head,
        "        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)\n",
    )
    assert _review(per_head) == []  # `hidden_size // heads` is what __init__ set head_dim to


def test_a_norm_given_the_head_dim_the_config_names_by_keyword_is_one_head_wide():
    """Gemma3: `self.head_dim = getattr(config, "head_dim", ...)` and `RMSNorm(dim=config.head_dim)`."""
    source = vary(
        MINI_MODEL,
        "        self.head_dim = config.hidden_size // config.num_attention_heads\n",
        '        self.head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)\n',
    )
    source = vary(
        source,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        "        self.q_norm = nn.RMSNorm(normalized_shape=config.head_dim)\n",
    )
    source = vary(
        source,
        "        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)\n",
    )
    assert _review(source) == []
    wide = source.replace("normalized_shape=config.head_dim", "normalized_shape=config.hidden_size")
    assert any("self.q_norm" in item for item in _review(wide))


_WEIGHTLESS_NORM = """
class WeightlessNorm(nn.Module):
    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class MiniAttention"""


def test_a_weightless_last_dim_norm_works_per_head_on_a_per_head_view_only():
    """NanoChat: `self.q_norm = RMSNorm(eps=...)` with no weight, on q viewed `[..., heads, head_dim]`:
    each head is normalized by itself, whatever heads a rank holds. On the flat q it would
    normalize the rank's share of the features instead of the whole width."""
    source = MINI_MODEL.replace("class MiniAttention", _WEIGHTLESS_NORM, 1)
    source = vary(
        source,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        "        self.q_norm = WeightlessNorm(eps=config.rms_norm_eps)\n",
    )
    per_head = vary(
        source,
        "        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)\n",
    )
    assert _review(per_head) == []
    flat = vary(
        source,
        "        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)\n",
        "        query_states = self.q_norm(self.q_proj(hidden_states)).view(hidden_shape).transpose(1, 2)\n",
    )
    assert any(
        "`self.q_norm(" in item and "not known to work on a split tensor" in item for item in _review(flat)
    )
    # A norm over every dimension but the first is not one head's, even on a per-head view.
    whole = per_head.replace("x.pow(2).mean(-1, keepdim=True)", "x.pow(2).mean((-2, -1), keepdim=True)")
    assert any("self.q_norm" in item for item in _review(whole))
    # Nor one that moves another dimension last first.
    moved = per_head.replace("x.pow(2).mean(-1", "x.transpose(-1, -2).pow(2).mean(-1")
    assert any("self.q_norm" in item for item in _review(moved))
