"""engine-interface: forwards take the engine's inputs, calls are rebuilt from them, each returns one tensor."""

from __future__ import annotations

import libcst as cst

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    method_code,
    normalize,
    replace_method,
    run_rewrites,
    signature,
    vary,
)


def test_attention_takes_its_cache_and_metadata_and_returns_one_tensor():
    after = run_rewrites(MINI_MODEL, "engine-interface")
    assert_code(
        signature(after.code, "MiniAttention", "forward"),
        "def forward(self, hidden_states, kv_cache, input_metadata): ...",
    )
    assert method_code(after.code, "MiniAttention", "forward").rstrip().endswith("return attn_output")


def test_decoder_layer_calls_attention_with_the_new_signature_and_takes_one_result():
    after = run_rewrites(MINI_MODEL, "engine-interface")
    assert_code(
        method_code(after.code, "MiniDecoderLayer", "forward"),
        """
        def forward(self, hidden_states, kv_cache, input_metadata):
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states = self.self_attn(hidden_states, kv_cache, input_metadata)
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
            return hidden_states
        """,
    )


def test_backbone_loop_gives_each_layer_its_own_cache_and_returns_the_hidden_states():
    after = run_rewrites(MINI_MODEL, "engine-interface")
    assert_code(
        signature(after.code, "MiniModel", "forward"),
        "def forward(self, input_ids, positions, kv_caches, input_metadata): ...",
    )
    forward = normalize(method_code(after.code, "MiniModel", "forward"))
    assert_code(
        forward.split("hidden_states = inputs_embeds\n", 1)[1],
        """
        for layer_idx, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(hidden_states, kv_caches[layer_idx], input_metadata)
        hidden_states = self.norm(hidden_states)
        return hidden_states
        """,
    )


def test_an_existing_layer_index_is_reused():
    before = vary(
        MINI_MODEL,
        "        for decoder_layer in self.layers:",
        "        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):",
    )
    after = run_rewrites(before, "engine-interface")
    assert_code(
        normalize(method_code(after.code, "MiniModel", "forward")).split(
            "hidden_states = inputs_embeds\n", 1
        )[1],
        """
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(hidden_states, kv_caches[i], input_metadata)
        hidden_states = self.norm(hidden_states)
        return hidden_states
        """,
    )


def test_causal_lm_calls_the_backbone_positionally_and_reads_its_tensor():
    after = run_rewrites(MINI_MODEL, "engine-interface")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "forward"),
        """
        @auto_docstring
        def forward(self, input_ids, positions, kv_caches, input_metadata):
            outputs = self.model(input_ids, positions, kv_caches, input_metadata)
            hidden_states = outputs
            logits = self.lm_head(hidden_states)
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels)
            return logits
        """,
    )


def test_indexed_and_annotated_submodule_results_become_the_tensor():
    before = replace_method(
        MINI_MODEL,
        "MiniForCausalLM",
        "forward",
        '''
        def forward(self, input_ids: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
            """Documents HF arguments that are gone."""
            outputs: BaseModelOutputWithPast = self.model(input_ids=input_ids, **kwargs)
            logits = self.lm_head(outputs[0])
            cache = outputs.past_key_values
            return (logits, cache)
        ''',
    )
    after = run_rewrites(before, "engine-interface")
    assert_code(
        method_code(after.code, "MiniForCausalLM", "forward"),
        """
        def forward(self, input_ids: torch.LongTensor | None, positions, kv_caches, input_metadata):
            outputs = self.model(input_ids, positions, kv_caches, input_metadata)
            logits = self.lm_head(outputs)
            cache = _porter_dropped_output
            return logits
        """,
    )


def test_position_ids_become_positions_all_the_way_down():
    before = vary(
        MINI_MODEL,
        "    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):\n        input_shape",
        "    def forward(self, hidden_states, position_ids, attention_mask=None, **kwargs):\n        input_shape",
    )
    before = vary(
        before,
        "        if past_key_values is not None:\n            key_states, value_states",
        "        query_states, key_states = rotate(query_states, key_states, position_ids=position_ids)\n"
        "        if past_key_values is not None:\n            key_states, value_states",
    )
    before = vary(
        before,
        "hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs",
        "hidden_states, position_ids, attention_mask=attention_mask, **kwargs",
    )
    before = vary(
        before,
        "    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):\n        residual",
        "    def forward(self, hidden_states, attention_mask=None, position_ids=None, **kwargs):\n        residual",
    )
    after = run_rewrites(before, "engine-interface")
    code = after.formatted
    assert "query_states, key_states = rotate(query_states, key_states, position_ids=positions)" in code
    assert "hidden_states = self.self_attn(hidden_states, positions, kv_cache, input_metadata)" in code
    assert (
        "hidden_states = decoder_layer(hidden_states, positions, kv_caches[layer_idx], input_metadata)"
        in code
    )
    assert after.context.plan.signatures["MiniDecoderLayer"] == [
        "hidden_states",
        "positions",
        "kv_cache",
        "input_metadata",
    ]


def test_module_whose_forward_needs_nothing_new_keeps_its_signature():
    after = run_rewrites(MINI_MODEL, "engine-interface")
    assert "MiniMLP" not in after.context.plan.signatures
    assert method_code(after.code, "MiniMLP", "forward") == method_code(MINI_MODEL, "MiniMLP", "forward")


def test_dropped_parameters_are_recorded_for_the_dead_code_rewrite():
    after = run_rewrites(MINI_MODEL, "engine-interface")
    assert after.context.plan.dropped_params["MiniModel"] == {
        "attention_mask",
        "past_key_values",
        "inputs_embeds",
        "use_cache",
        "kwargs",
    }
    assert after.context.plan.dropped_params["MiniForCausalLM"] == {
        "attention_mask",
        "past_key_values",
        "labels",
        "kwargs",
    }


def _returns_a_tuple_variable(forward_code: str) -> bool:
    """Whether the forward returns a name whose last top-level assignment was a tuple display."""
    function = cst.parse_statement(forward_code)
    statements = [s for s in function.body.body if isinstance(s, cst.SimpleStatementLine)]
    last = statements[-1].body[0]
    if not (isinstance(last, cst.Return) and isinstance(last.value, cst.Name)):
        return False
    for statement in reversed(statements[:-1]):
        small = statement.body[0]
        if (
            isinstance(small, cst.Assign)
            and cst.Module([]).code_for_node(small.targets[0].target) == last.value.value
        ):
            return isinstance(small.value, cst.Tuple)
    return False


def test_layer_returning_a_tuple_variable_returns_one_tensor():
    before = replace_method(
        MINI_MODEL,
        "MiniDecoderLayer",
        "forward",
        """
        def forward(self, hidden_states, attention_mask=None, output_attentions=False, **kwargs):
            residual = hidden_states
            hidden_states, self_attn_weights = self.self_attn(hidden_states, attention_mask=attention_mask)
            hidden_states = residual + hidden_states
            outputs = (hidden_states,)
            if output_attentions:
                outputs += (self_attn_weights,)
            return outputs
        """,
    )
    before = vary(
        before,
        "            hidden_states = decoder_layer(\n"
        "                hidden_states, attention_mask=causal_mask, past_key_values=past_key_values, **kwargs\n"
        "            )",
        "            layer_outputs = decoder_layer(hidden_states, attention_mask=causal_mask)\n"
        "            hidden_states = layer_outputs[0]",
    )
    after = run_rewrites(before, "engine-interface", "dead-code")
    # The backbone now takes the layer's result as the hidden states themselves...
    assert "hidden_states = layer_outputs\n" in normalize(method_code(after.code, "MiniModel", "forward"))
    # ...so the layer must return a tensor (or say it cannot).
    layer_forward = method_code(after.code, "MiniDecoderLayer", "forward")
    assert not _returns_a_tuple_variable(layer_forward)
