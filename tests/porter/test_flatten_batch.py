"""flatten-batch: no batch dimension in sizes, views and transposes; token ids and positions stay 1-D.

flatten-batch works on forwards engine-interface rewrote, and needs the head size paged-attention
read, so each test runs those two first.
"""

from __future__ import annotations

import builtins

import libcst as cst

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    method_code,
    normalize,
    replace_method,
    run_rewrites,
    vary,
)

PREREQUISITES = ("paged-attention", "engine-interface")


def _attention_forward(forward: str) -> str:
    before = replace_method(MINI_MODEL, "MiniAttention", "forward", forward)
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    return method_code(after.code, "MiniAttention", "forward")


def test_size_unpacking_keeps_only_the_token_count():
    assert_code(
        _attention_forward(
            """
            def forward(self, hidden_states, attention_mask=None, **kwargs):
                bsz, q_len, _ = hidden_states.size()
                query_states = self.q_proj(hidden_states)
                key_states = self.k_proj(hidden_states)
                value_states = self.v_proj(hidden_states)
                attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, None)
                return self.o_proj(attn_output.reshape(bsz, q_len, -1)), attn_weights
            """
        ),
        """
        def forward(self, hidden_states, kv_cache, input_metadata):
            q_len = hidden_states.shape[0]
            query_states = self.q_proj(hidden_states)
            key_states = self.k_proj(hidden_states)
            value_states = self.v_proj(hidden_states)
            attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata)
            return self.o_proj(attn_output.reshape(q_len, -1))
        """,
    )


def test_shape_unpacking_of_only_the_batch_goes():
    assert_code(
        _attention_forward(
            """
            def forward(self, hidden_states, **kwargs):
                bsz, _, _ = hidden_states.shape
                query_states = self.q_proj(hidden_states)
                key_states = self.k_proj(hidden_states)
                value_states = self.v_proj(hidden_states)
                attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, None)
                return self.o_proj(attn_output.view(bsz, -1))
            """
        ),
        """
        def forward(self, hidden_states, kv_cache, input_metadata):
            query_states = self.q_proj(hidden_states)
            key_states = self.k_proj(hidden_states)
            value_states = self.v_proj(hidden_states)
            attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata)
            return self.o_proj(attn_output.view(-1))
        """,
    )


def test_per_head_views_become_unflatten_and_head_transposes_go():
    assert_code(
        _attention_forward(
            """
            def forward(self, hidden_states, **kwargs):
                bsz, q_len, _ = hidden_states.size()
                query_states = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
                key_states = self.k_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
                value_states = self.v_proj(hidden_states).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
                attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, None)
                attn_output = attn_output.reshape(bsz, q_len, -1).contiguous()
                return self.o_proj(attn_output), attn_weights
            """
        ),
        """
        def forward(self, hidden_states, kv_cache, input_metadata):
            q_len = hidden_states.shape[0]
            query_states = self.q_proj(hidden_states).unflatten(-1, (-1, self.head_dim))
            key_states = self.k_proj(hidden_states).unflatten(-1, (-1, self.head_dim))
            value_states = self.v_proj(hidden_states).unflatten(-1, (-1, self.head_dim))
            attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata)
            attn_output = attn_output.reshape(q_len, -1).contiguous()
            return self.o_proj(attn_output)
        """,
    )


def test_token_ids_and_positions_are_not_reshaped_to_two_dimensions():
    before = replace_method(
        MINI_MODEL,
        "MiniModel",
        "forward",
        """
        def forward(self, input_ids=None, position_ids=None):
            input_ids = input_ids.view(-1, input_ids.shape[-1])
            position_ids = position_ids.unsqueeze(0)
            hidden_states = self.embed_tokens(input_ids) + self.embed_positions(position_ids)
            for decoder_layer in self.layers:
                hidden_states = decoder_layer(hidden_states)
            return self.norm(hidden_states)
        """,
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    assert_code(
        method_code(after.code, "MiniModel", "forward"),
        """
        def forward(self, input_ids, positions, kv_caches, input_metadata):
            hidden_states = self.embed_tokens(input_ids) + self.embed_positions(positions)
            for layer_idx, decoder_layer in enumerate(self.layers):
                hidden_states = decoder_layer(hidden_states, kv_caches[layer_idx], input_metadata)
            return self.norm(hidden_states)
        """,
    )


def test_batch_dimension_in_a_view_outside_attention_goes():
    before = vary(
        MINI_MODEL,
        "        residual = hidden_states\n        hidden_states = self.input_layernorm(hidden_states)\n",
        "        batch_size, seq_len, _ = hidden_states.shape\n"
        "        hidden_states = hidden_states.view(batch_size, seq_len, -1)\n"
        "        residual = hidden_states\n        hidden_states = self.input_layernorm(hidden_states)\n",
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    layer = method_code(after.code, "MiniDecoderLayer", "forward")
    assert_code(
        "\n".join(layer.splitlines()[:4]),
        """
        def forward(self, hidden_states, kv_cache, input_metadata):
            seq_len = hidden_states.shape[0]
            hidden_states = hidden_states.view(seq_len, -1)
            residual = hidden_states
        """,
    )


def _unbound_names(function_code: str, known: set[str]) -> set[str]:
    """Names a function reads that are neither its parameters, assigned in it, builtins, nor `known`."""
    function = cst.parse_statement(function_code)
    bound = {p.name.value for p in function.params.params} | known | set(dir(builtins))
    read: set[str] = set()

    class _Names(cst.CSTVisitor):
        def visit_AssignTarget(self, node: cst.AssignTarget) -> None:
            for name in _target_names(node.target):
                bound.add(name)

        def visit_Attribute(self, node: cst.Attribute) -> bool:
            node.value.visit(self)
            return False

        def visit_Arg(self, node: cst.Arg) -> bool:
            node.value.visit(self)
            return False

        def visit_Name(self, node: cst.Name) -> None:
            read.add(node.value)

    function.body.visit(_Names())
    return read - bound


def _target_names(target: cst.BaseExpression) -> list[str]:
    if isinstance(target, cst.Name):
        return [target.value]
    if isinstance(target, (cst.Tuple, cst.List)):
        return [n for e in target.elements for n in _target_names(e.value)]
    return []


def test_unpacked_hidden_size_that_is_read_later_stays_bound():
    before = vary(
        MINI_MODEL,
        "        residual = hidden_states\n        hidden_states = self.input_layernorm(hidden_states)\n",
        "        batch_size, seq_len, hidden_size = hidden_states.shape\n"
        "        hidden_states = hidden_states.view(batch_size, seq_len, hidden_size)\n"
        "        residual = hidden_states\n        hidden_states = self.input_layernorm(hidden_states)\n",
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    assert _unbound_names(method_code(after.code, "MiniDecoderLayer", "forward"), {"self"}) == set()


def test_batch_unpacking_in_a_forward_whose_signature_is_unchanged_goes():
    before = replace_method(
        MINI_MODEL,
        "MiniMLP",
        "forward",
        """
        def forward(self, hidden_states):
            batch_size, sequence_length, hidden_dim = hidden_states.shape
            hidden_states = hidden_states.view(-1, hidden_dim)
            hidden_states = self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))
            return hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        """,
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    forward = method_code(after.code, "MiniMLP", "forward")
    assert "batch_size" not in forward
    assert _unbound_names(forward, {"self"}) == set()


def test_a_transpose_outside_attention_is_left_alone():
    before = vary(
        MINI_MODEL,
        "        hidden_states = self.mlp(hidden_states)\n",
        "        hidden_states = self.mlp(hidden_states.transpose(1, 2)).transpose(1, 2)\n",
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    assert "hidden_states = self.mlp(hidden_states.transpose(1, 2)).transpose(1, 2)" in after.formatted


def test_a_reshape_back_to_a_batch_shaped_output_goes_with_the_sizes_only_it_read():
    # GPT-Neo's backbone: `seq_length = inputs_embeds.shape[1]` is the hidden width once tokens are
    # flattened, so keeping `view(-1, seq_length, hidden)` failed (and would add a batch axis anyway).
    before = vary(
        MINI_MODEL,
        "        hidden_states = self.norm(hidden_states)\n",
        "        hidden_states = self.norm(hidden_states)\n        hidden_states = hidden_states.view(output_shape)\n",
    )
    before = vary(
        before,
        "        for decoder_layer in self.layers",
        "        seq_length = inputs_embeds.shape[1]\n"
        "        output_shape = (-1, seq_length, hidden_states.size(-1))\n"
        "        for decoder_layer in self.layers",
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    backbone = method_code(after.code, "MiniModel", "forward")
    assert "output_shape" not in backbone
    assert "seq_length" not in backbone
    assert "hidden_states = self.norm(hidden_states)" in backbone


def test_a_head_split_sized_from_the_leading_dimensions_infers_the_head_count():
    # GPT-Neo's `_split_heads`: the global head count is not this rank's.
    forward = _attention_forward(
        """
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        query_states = self.q_proj(hidden_states)
        query_states = query_states.view(query_states.size()[:-1] + (self.config.num_attention_heads, self.head_dim))
        key_states = self.k_proj(hidden_states).view(hidden_states.shape[:-1] + (-1, self.head_dim))
        value_states = self.v_proj(hidden_states).view(hidden_states.shape[:-1] + (-1, self.head_dim))
        attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask)
        return self.o_proj(attn_output.reshape(hidden_states.shape[0], -1)), attn_weights
"""
    )
    assert "query_states.size()[:-1] + (-1, self.head_dim)" in forward


def test_a_branch_on_the_tensor_rank_keeps_the_rank_four_case_and_no_ops_go():
    # GPT-J's head split dispatches on `len(tensor.shape)` (5: blocked, 4: batched, else raise);
    # per-token [T, H, D] rows stand where [B, S, H, D] stood, so the rank-4 branch is the one.
    forward = _attention_forward(
        """
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        query_states = self.q_proj(hidden_states).view(hidden_states.shape[:-1] + (-1, self.head_dim))
        if len(query_states.shape) == 5:
            query_states = query_states.permute(0, 1, 3, 2, 4)
        elif len(query_states.shape) == 4:
            query_states = query_states.permute(0, 2, 1, 3)
        else:
            raise ValueError("rank")
        key_states = self.k_proj(hidden_states).view(hidden_states.shape[:-1] + (-1, self.head_dim))
        value_states = self.v_proj(hidden_states).view(hidden_states.shape[:-1] + (-1, self.head_dim))
        attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask)
        return self.o_proj(attn_output.reshape(hidden_states.shape[0], -1)), attn_weights
"""
    )
    assert "len(query_states.shape)" not in forward and "raise" not in forward
    assert "query_states = query_states" not in forward  # what the permute left was a no-op


def test_a_per_position_factor_from_a_module_helper_is_shaped_for_per_token_rows():
    # Ministral3's Llama-4 query scale: `[B, S]` positions -> `[B, 1, S, 1]` against `[B, H, S, D]`.
    helper = """
def position_scale(positions_ids, beta):
    scaling = 1 + beta * torch.log(1 + positions_ids)
    return scaling[:, None, :, None]


def unrelated(x):
    return x[:, None, :, None]
"""
    source = MINI_MODEL.replace("class MiniAttention", helper + "\n\nclass MiniAttention", 1)
    before = replace_method(
        source,
        "MiniAttention",
        "forward",
        """
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query_states = query_states * position_scale(position_ids, 0.5).to(query_states.dtype)
        attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, attention_mask)
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights
""",
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch").code
    assert "position_scale(positions, 0.5)" in after
    assert "return scaling[:, None, None]" in after
    assert "return x[:, None, :, None]" in after  # not called with the positions: left alone


def _with_einops(source: str) -> str:
    return vary(source, "import torch\n", "import torch\nfrom einops import rearrange\n")


def test_an_einops_pattern_keeping_batch_and_sequence_in_place_loses_the_batch_axis():
    # InternLM2's fused wqkv split: "b q (h gs d)" on [T, hidden] tokens has one axis too many.
    before = replace_method(
        _with_einops(MINI_MODEL),
        "MiniAttention",
        "forward",
        """
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            bsz, q_len, _ = hidden_states.size()
            qkv_states = self.q_proj(hidden_states)
            qkv_states = rearrange(
                qkv_states,
                "b q (h gs d) -> b q h gs d",
                gs=2 + self.num_key_value_groups,
                d=self.head_dim,
            )
            query_states = qkv_states[..., : self.num_key_value_groups, :]
            query_states = rearrange(query_states, "b q h gs d -> b q (h gs) d", b=bsz).transpose(1, 2)
            key_states = qkv_states[..., -2, :].transpose(1, 2)
            value_states = qkv_states[..., -1, :].transpose(1, 2)
            attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, None)
            return self.o_proj(attn_output.reshape(bsz, q_len, -1)), attn_weights
        """,
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    forward = normalize(method_code(after.code, "MiniAttention", "forward"))
    assert '"q (h gs d) -> q h gs d", gs=2 + self.num_key_value_groups, d=self.head_dim\n' in forward
    assert 'rearrange(query_states, "q h gs d -> q (h gs) d")' in forward  # b=bsz went too


def test_an_einops_pattern_that_moves_its_second_axis_is_left_alone():
    # "b h s d -> b s (h d)": the second axis is not the sequence; dropping the first would misread it.
    before = replace_method(
        _with_einops(MINI_MODEL),
        "MiniAttention",
        "forward",
        """
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            query_states = self.q_proj(hidden_states)
            key_states = self.k_proj(hidden_states)
            value_states = self.v_proj(hidden_states)
            attn_output, attn_weights = attention_interface(self, query_states, key_states, value_states, None)
            return self.o_proj(rearrange(attn_output, "b h s d -> b s (h d)")), attn_weights
        """,
    )
    after = run_rewrites(before, *PREREQUISITES, "flatten-batch")
    assert '"b h s d -> b s (h d)"' in method_code(after.code, "MiniAttention", "forward")
