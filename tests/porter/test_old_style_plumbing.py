"""4.3x-style plumbing around the layers: sliced-weight branches, shape asserts, layer loops zipped
with tuple caches, output tuples built by concatenation, 2-D token ids and positions."""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    method_code,
    replace_method,
    run_rewrites,
    run_through,
    vary,
)


def test_a_branch_computing_the_linears_from_weight_slices_keeps_the_module_calls():
    before = replace_method(
        MINI_MODEL,
        "MiniMLP",
        "forward",
        """
        def forward(self, x):
            if self.config.pretraining_tp > 1:
                slice = self.intermediate_size // self.config.pretraining_tp
                gate_proj_slices = self.gate_proj.weight.split(slice, dim=0)
                up_proj_slices = self.up_proj.weight.split(slice, dim=0)
                down_proj_slices = self.down_proj.weight.split(slice, dim=1)
                gate_proj = torch.cat([F.linear(x, s) for s in gate_proj_slices], dim=-1)
                up_proj = torch.cat([F.linear(x, s) for s in up_proj_slices], dim=-1)
                parts = (self.act_fn(gate_proj) * up_proj).split(slice, dim=2)
                down_proj = sum(F.linear(p, s) for p, s in zip(parts, down_proj_slices))
            else:
                down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return down_proj
        """,
    )
    after = run_rewrites(before, "sliced-linears")
    assert_code(
        method_code(after.code, "MiniMLP", "forward"),
        """
        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return down_proj
        """,
    )
    assert after.changes("sliced-linears", "MiniMLP.forward")


def test_a_branch_that_reads_weights_without_a_functional_linear_is_left_alone():
    forward = """
        def forward(self, x):
            if self.config.tie_scale:
                return x * self.down_proj.weight.norm()
            else:
                return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        """
    after = run_rewrites(replace_method(MINI_MODEL, "MiniMLP", "forward", forward), "sliced-linears")
    assert "if self.config.tie_scale:" in method_code(after.code, "MiniMLP", "forward")


def test_a_check_of_the_batched_score_shape_goes_and_a_config_check_stays():
    before = vary(
        MINI_MODEL,
        "    attn_weights = nn.functional.softmax(attn_weights, dim=-1)\n",
        "    if attn_weights.size() != (query.shape[0], query.shape[1], query.shape[2], key.shape[2]):\n"
        '        raise ValueError(f"Attention weights should be of size {attn_weights.size()}")\n'
        "    if module.num_heads % 2:\n"
        '        raise ValueError("odd")\n'
        "    attn_weights = nn.functional.softmax(attn_weights, dim=-1)\n",
    )
    after = run_rewrites(before, "shape-checks")
    eager = after.code.split("def eager_attention_forward", 1)[1].split("class MiniMLP", 1)[0]
    assert "attn_weights.size()" not in eager
    assert "if module.num_heads % 2:" in eager


def _backbone(forward: str, last: str = "dead-code") -> str:
    return method_code(
        run_through(replace_method(MINI_MODEL, "MiniModel", "forward", forward), last).code,
        "MiniModel",
        "forward",
    )


def test_a_layer_loop_zipped_with_tuple_caches_keeps_only_the_layers():
    forward = _backbone(
        """
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            if past_key_values is None:
                past_key_values = tuple([None] * len(self.layers))
            hidden_states = self.embed_tokens(input_ids)
            for i, (layer, layer_past) in enumerate(zip(self.layers, past_key_values)):
                outputs = layer(hidden_states, past_key_values=layer_past, use_cache=use_cache)
                hidden_states = outputs[0]
            return self.norm(hidden_states)
        """
    )
    assert_code(
        forward,
        """
        def forward(self, input_ids, positions, kv_caches, input_metadata):
            hidden_states = self.embed_tokens(input_ids)
            for i, layer in enumerate(self.layers):
                outputs = layer(hidden_states, kv_caches[i], input_metadata)
                hidden_states = outputs
            return self.norm(hidden_states)
        """,
    )


def test_a_zipped_cache_read_outside_the_layer_call_leaves_the_loop_to_review():
    source = replace_method(
        MINI_MODEL,
        "MiniModel",
        "forward",
        """
        def forward(self, input_ids=None, past_key_values=None):
            hidden_states = self.embed_tokens(input_ids)
            for layer, layer_past in zip(self.layers, past_key_values):
                hidden_states = layer(hidden_states) + layer_past[0].sum()
            return self.norm(hidden_states)
        """,
    )
    after = run_through(source, "dead-code")
    assert not after.changes("layer-loops")
    assert any("iterates over removed past_key_values" in m for m in after.review_messages())


def test_an_output_tuple_built_by_concatenation_returns_its_first_tensor_and_the_rest_goes():
    before = replace_method(
        MINI_MODEL,
        "MiniDecoderLayer",
        "forward",
        """
        def forward(self, hidden_states, attention_mask=None, use_cache=False, **kwargs):
            attention_outputs = self.self_attn(self.input_layernorm(hidden_states), attention_mask=attention_mask)
            attn_output = attention_outputs[0]
            outputs = attention_outputs[1:]
            hidden_states = self.mlp(self.post_attention_layernorm(hidden_states)) + attn_output + hidden_states
            if use_cache:
                outputs = (hidden_states,) + outputs
            else:
                outputs = (hidden_states,) + outputs[1:]
            return outputs
        """,
    )
    assert_code(
        method_code(run_through(before, "dead-code").code, "MiniDecoderLayer", "forward"),
        """
        def forward(self, hidden_states, kv_cache, input_metadata):
            attention_outputs = self.self_attn(self.input_layernorm(hidden_states), kv_cache, input_metadata)
            attn_output = attention_outputs
            hidden_states = self.mlp(self.post_attention_layernorm(hidden_states)) + attn_output + hidden_states
            return hidden_states
        """,
    )


def test_two_dimensional_token_ids_and_positions_stay_one_dimensional():
    source = replace_method(
        MINI_MODEL,
        "MiniModel",
        "forward",
        """
        def forward(self, input_ids=None, position_ids=None, inputs_embeds=None):
            batch_size, seq_length = input_ids.shape
            position_ids = position_ids.view(-1, seq_length).long()
            hidden_states = self.embed_tokens(input_ids)
            for decoder_layer in self.layers:
                hidden_states = decoder_layer(hidden_states, position_ids=position_ids)
            return self.norm(hidden_states)
        """,
    )
    forward = method_code(
        run_rewrites(source, "engine-interface", "flatten-batch").code, "MiniModel", "forward"
    )
    assert "seq_length = input_ids.shape[0]\n" in forward
    assert "batch_size" not in forward and "positions.view" not in forward


def test_a_method_named_only_in_a_comment_is_pruned():
    before = vary(
        MINI_MODEL,
        "    def forward(\n        self, input_ids=None",
        "    # Copied from transformers.models.bart.modeling_bart.BartDecoder._prepare_mask\n"
        "    def _prepare_mask(self, attention_mask):\n"
        "        return attention_mask\n\n"
        "    def forward(\n        self, input_ids=None",
    )
    after = run_rewrites(before, "prune")
    assert "def _prepare_mask" not in after.code


def test_a_causal_mask_buffer_nothing_reads_goes_with_the_init_helper_that_built_it():
    before = vary(
        MINI_MODEL,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        "        self._init_bias(config.max_position_embeddings)\n"
        '        self.register_buffer("masked_bias", torch.tensor(-1e9), persistent=False)\n'
        '        self.register_buffer("position_scale", torch.ones(1))\n\n'
        "    def _init_bias(self, max_positions, device=None):\n"
        '        self.register_buffer("bias", torch.ones(max_positions, max_positions).tril(), persistent=False)\n'
        "        if device is not None:\n"
        "            self.bias = self.bias.to(device)\n",
    )
    after = run_rewrites(before, "prune")
    init = method_code(after.code, "MiniAttention", "__init__")
    assert "_init_bias" not in after.code and "masked_bias" not in init
    # a persistent buffer is in the checkpoint: it stays whether or not the port reads it
    assert 'self.register_buffer("position_scale", torch.ones(1))' in init


def test_an_nn_buffer_mask_nothing_reads_goes_with_the_locals_that_only_built_it():
    # transformers 5 writes `self.bias = nn.Buffer(bias, persistent=False)` (GPT-Neo, GPT-BigCode):
    # a [max_positions, max_positions] mask per layer that the paged port never reads.
    before = vary(
        MINI_MODEL,
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n",
        "        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)\n"
        "        max_positions = config.max_position_embeddings\n"
        "        bias = torch.tril(torch.ones((max_positions, max_positions), dtype=bool))\n"
        "        if layer_idx % 2:\n"
        "            bias = torch.bitwise_xor(bias, torch.tril(bias, -4))\n"
        "        self.bias = nn.Buffer(bias, persistent=False)\n"
        "        self.kept_positions = config.max_position_embeddings\n"
        "        self.scale_table = nn.Buffer(torch.ones(4))\n",
    )
    after = run_rewrites(before, "prune")
    init = method_code(after.code, "MiniAttention", "__init__")
    assert "bias" not in init.replace("bias=False", "")
    assert "max_positions" not in init
    assert "self.kept_positions = config.max_position_embeddings" in init
    assert "self.scale_table = nn.Buffer(torch.ones(4))" in init  # persistent: in the checkpoint
