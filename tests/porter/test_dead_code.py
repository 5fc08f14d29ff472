"""dead-code: with the plumbing parameters gone, decided conditions keep one branch and what read them goes.

Every test runs engine-interface first: it decides which parameters the forward lost.
"""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    method_code,
    replace_method,
    run_rewrites,
)


def _backbone(forward: str):
    """MINI_MODEL with MiniModel.forward replaced, after engine-interface and dead-code."""
    return run_rewrites(
        replace_method(MINI_MODEL, "MiniModel", "forward", forward), "engine-interface", "dead-code"
    )


def _backbone_forward(forward: str) -> str:
    return method_code(_backbone(forward).code, "MiniModel", "forward")


SIGNATURE = "def forward(self, input_ids, positions, kv_caches, input_metadata):\n"


def test_absent_inputs_embeds_keeps_the_branch_that_embeds_input_ids():
    assert_code(
        _backbone_forward(
            """
            def forward(self, input_ids=None, inputs_embeds=None):
                if inputs_embeds is None:
                    inputs_embeds = self.embed_tokens(input_ids)
                return self.norm(inputs_embeds)
            """
        ),
        SIGNATURE + "    inputs_embeds = self.embed_tokens(input_ids)\n    return self.norm(inputs_embeds)\n",
    )


def test_exactly_one_of_ids_or_embeds_check_is_decided_and_goes():
    assert_code(
        _backbone_forward(
            """
            def forward(self, input_ids=None, inputs_embeds=None):
                if (input_ids is None) ^ (inputs_embeds is not None):
                    raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
                return self.embed_tokens(input_ids)
            """
        ),
        SIGNATURE + "    return self.embed_tokens(input_ids)\n",
    )


def test_mask_construction_and_everything_built_from_it_goes():
    assert_code(
        _backbone_forward(
            """
            def forward(self, input_ids=None, attention_mask=None):
                hidden_states = self.embed_tokens(input_ids)
                causal_mask = build_causal_mask(attention_mask, hidden_states)
                expanded_mask = causal_mask[:, None, :, :]
                hidden_states = self.norm(hidden_states)
                return hidden_states
            """
        ),
        SIGNATURE + "    hidden_states = self.embed_tokens(input_ids)\n"
        "    hidden_states = self.norm(hidden_states)\n    return hidden_states\n",
    )


def test_in_place_masking_step_goes_and_the_data_flow_survives():
    assert_code(
        _backbone_forward(
            """
            def forward(self, input_ids=None, attention_mask=None):
                hidden_states = self.embed_tokens(input_ids)
                hidden_states = hidden_states * attention_mask[..., None]
                return self.norm(hidden_states)
            """
        ),
        SIGNATURE + "    hidden_states = self.embed_tokens(input_ids)\n    return self.norm(hidden_states)\n",
    )


def test_cache_setup_behind_use_cache_goes():
    assert_code(
        _backbone_forward(
            """
            def forward(self, input_ids=None, past_key_values=None, use_cache=None):
                if use_cache and past_key_values is None:
                    past_key_values = DynamicCache(config=self.config)
                return self.embed_tokens(input_ids)
            """
        ),
        SIGNATURE + "    return self.embed_tokens(input_ids)\n",
    )


def test_training_and_gradient_checkpointing_branches_keep_the_else():
    assert_code(
        _backbone_forward(
            """
            def forward(self, input_ids=None, use_cache=None):
                hidden_states = self.embed_tokens(input_ids)
                if self.gradient_checkpointing and self.training:
                    hidden_states = checkpoint(self.norm, hidden_states)
                else:
                    hidden_states = self.norm(hidden_states)
                return hidden_states
            """
        ),
        SIGNATURE + "    hidden_states = self.embed_tokens(input_ids)\n"
        "    hidden_states = self.norm(hidden_states)\n    return hidden_states\n",
    )


def test_output_flag_accumulators_go_inside_and_outside_the_layer_loop():
    assert_code(
        _backbone_forward(
            """
            def forward(self, input_ids=None, output_hidden_states=None, return_dict=None):
                output_hidden_states = output_hidden_states if output_hidden_states is not None else False
                hidden_states = self.embed_tokens(input_ids)
                all_hidden_states = () if output_hidden_states else None
                for decoder_layer in self.layers:
                    if output_hidden_states:
                        all_hidden_states += (hidden_states,)
                    hidden_states = decoder_layer(hidden_states)
                hidden_states = self.norm(hidden_states)
                if not return_dict:
                    return tuple(v for v in [hidden_states, all_hidden_states] if v is not None)
                return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states)
            """
        ),
        """
        def forward(self, input_ids, positions, kv_caches, input_metadata):
            hidden_states = self.embed_tokens(input_ids)
            for layer_idx, decoder_layer in enumerate(self.layers):
                hidden_states = decoder_layer(hidden_states, kv_caches[layer_idx], input_metadata)
            hidden_states = self.norm(hidden_states)
            return hidden_states
        """,
    )


def test_a_condition_on_plumbing_it_cannot_decide_is_a_review_item():
    after = _backbone(
        """
        def forward(self, input_ids=None, attention_mask=None):
            hidden_states = self.embed_tokens(input_ids)
            if attention_mask.dim() == 2:
                hidden_states = hidden_states * 2
            return hidden_states
        """
    )
    # (This runs without the attention swap, so the attention core is flagged too; see the guard test.)
    assert (
        "dead-code @ MiniModel.forward: cannot decide `if attention_mask.dim() == 2`, which reads removed plumbing"
        in after.review_messages()
    )


def test_given_inputs_decide_their_is_none_checks():
    assert_code(
        _backbone_forward(
            """
            def forward(self, input_ids=None, attention_mask=None):
                if input_ids is not None:
                    hidden_states = self.embed_tokens(input_ids)
                else:
                    raise ValueError("no input")
                return hidden_states
            """
        ),
        SIGNATURE + "    hidden_states = self.embed_tokens(input_ids)\n    return hidden_states\n",
    )


def test_removed_code_is_recorded_for_the_review():
    after = _backbone(
        """
        def forward(self, input_ids=None, attention_mask=None):
            causal_mask = build_causal_mask(attention_mask, input_ids)
            return self.embed_tokens(input_ids)
        """
    )
    assert after.changes("dead-code", "MiniModel.forward") == [
        "causal_mask = build_causal_mask(attention_mask, input_ids) -> "
    ]


def test_a_submodule_call_reading_removed_plumbing_is_never_dropped_silently():
    after = _backbone(
        """
        def forward(self, input_ids=None, attention_mask=None):
            hidden_states = self.embed_tokens(input_ids)
            hidden_states = self.norm(hidden_states * attention_mask)
            return hidden_states
        """
    )
    assert "self.norm(hidden_states * attention_mask)" in after.code
    assert any("runs a submodule but reads removed attention_mask" in m for m in after.review_messages())


def test_a_loop_variable_that_picked_a_per_layer_mask_goes_once_the_mask_is_gone():
    from tests.porter.rewrite_helpers import run_through

    forward = """
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden_states = self.embed_tokens(input_ids)
        masks = {"full_attention": attention_mask}
        for i, decoder_layer in enumerate(self.layers):
            layer_type = self.config.layer_types[i]
            hidden_states = decoder_layer(hidden_states, attention_mask=masks[layer_type], **kwargs)
        hidden_states = self.norm(hidden_states)
        return hidden_states
    """
    after = run_through(replace_method(MINI_MODEL, "MiniModel", "forward", forward), "prune")
    code = method_code(after.code, "MiniModel", "forward")
    assert "layer_type" not in code and "masks" not in code
    assert "for i, decoder_layer in enumerate(self.layers):" in code


def test_a_loop_left_with_nothing_to_do_goes():
    # OLMo3's backbone built one rotary table per layer type in a loop; once the rotary plumbing
    # went, only `pass` was left in it.
    from tests.porter.rewrite_helpers import run_through

    forward = """
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden_states = self.embed_tokens(input_ids)
        masks = {}
        for layer_type in set(self.config.layer_types):
            masks[layer_type] = attention_mask
        for i, decoder_layer in enumerate(self.layers):
            hidden_states = decoder_layer(hidden_states, attention_mask=masks[self.config.layer_types[i]], **kwargs)
        return self.norm(hidden_states)
    """
    after = run_through(replace_method(MINI_MODEL, "MiniModel", "forward", forward), "prune")
    code = method_code(after.code, "MiniModel", "forward")
    assert "set(self.config.layer_types)" not in code and "pass" not in code
    assert "for i, decoder_layer in enumerate(self.layers):" in code


def test_a_table_grown_for_longer_sequences_goes_once_the_length_it_reads_is_gone():
    """`if max_pos > self.weights.size(0): self.make_weights(max_pos)` with `max_pos` built from the
    cache length: the engine never runs past max_model_len (capped at the model's maximum positions),
    so the guard and all it guarded go, and no review item is left for it."""
    after = _backbone(
        """
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None):
            past_length = past_key_values.get_seq_length()
            max_pos = input_ids.shape[1] + past_length
            if max_pos > self.table.size(0):
                self.make_table(max_pos)
            return self.embed_tokens(input_ids)
        """
    )
    assert not any("MiniModel.forward" in m for m in after.review_messages()), after.review_messages()
    assert_code(
        method_code(after.code, "MiniModel", "forward"),
        SIGNATURE + "    return self.embed_tokens(input_ids)\n",
    )


def test_a_guard_on_removed_plumbing_whose_test_does_more_than_ask_sizes_stays_a_review_item():
    after = _backbone(
        """
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None):
            past_length = past_key_values.get_seq_length()
            if self.grow(past_length):
                self.make_table(past_length)
            return self.embed_tokens(input_ids)
        """
    )
    assert (
        "dead-code @ MiniModel.forward: cannot decide `if self.grow(past_length)`, which reads removed plumbing"
        in after.review_messages()
    )


def test_a_buffer_moved_to_its_inputs_device_is_already_there_in_the_engine():
    """`if table.device != ids.device: table = table.to(ids.device)`: the engine keeps the model and
    its inputs on one device, so the branch never runs (CodeGen's sinusoid table)."""
    after = _backbone(
        """
        def forward(self, input_ids=None, attention_mask=None):
            table = self.table
            if table.device != input_ids.device:
                table = table.to(input_ids.device)
                self.table = table
            return self.embed_tokens(input_ids) + table[0]
        """
    )
    assert after.changes("dead-code", "MiniModel.forward")[0].startswith(
        "table.device != input_ids.device -> "
    )
    assert_code(
        method_code(after.code, "MiniModel", "forward"),
        SIGNATURE + "    table = self.table\n    return self.embed_tokens(input_ids) + table[0]\n",
    )


# openPangu's backbone: a legacy-cache check that admits None, a past length measured only from a
# list cache, and a mask built from it; a module-level flag commented down to False on both paths.
NPU_FLAG = """
if False:
    # NPU_ATTN = True
    NPU_ATTN = False
else:
    NPU_ATTN = False
"""


def test_legacy_cache_checks_a_past_length_and_a_module_flag_are_decided():
    source = replace_method(
        MINI_MODEL,
        "MiniModel",
        "forward",
        """
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None):
            if not isinstance(past_key_values, (type(None), Cache, list, tuple)):
                raise ValueError("The `past_key_values` should be a `Cache` object, `None`, or a list/tuple.")
            inputs_embeds = self.embed_tokens(input_ids)
            past_seen_tokens_for_mask = 0
            if isinstance(past_key_values, (list, tuple)) and len(past_key_values) > 0:
                past_seen_tokens_for_mask = past_key_values[0][0].current_length.item()
            if past_seen_tokens_for_mask > 0 and self.medusa_mask is not None:
                causal_mask = torch.zeros((1, 1, 4, past_seen_tokens_for_mask + 4), dtype=torch.bool)
                causal_mask[:, :, :, :past_seen_tokens_for_mask] = True
            else:
                causal_mask = build_causal_mask(attention_mask, inputs_embeds)
            self.attention_mask = causal_mask
            hidden_states = inputs_embeds
            if not self.training and NPU_ATTN:
                hidden_states = torch_npu.fused(hidden_states)
            return self.norm(hidden_states)
        """,
    )
    source = source.replace("\n\nclass MiniMLP(", NPU_FLAG + "\n\nclass MiniMLP(", 1)
    after = run_rewrites(source, "engine-interface", "decide-conditions", "dead-code")
    assert_code(
        method_code(after.code, "MiniModel", "forward"),
        SIGNATURE
        + "    inputs_embeds = self.embed_tokens(input_ids)\n"
        + "    hidden_states = inputs_embeds\n"
        + "    return self.norm(hidden_states)\n",
    )
    assert not [message for message in after.review_messages() if "MiniModel" in message]


def test_a_flag_a_function_rebinds_through_global_is_not_decided():
    import libcst as cst

    from porter.analysis.module_flags import module_flags

    source = NPU_FLAG + "\ndef enable():\n    global NPU_ATTN\n    NPU_ATTN = True\n"
    assert module_flags(cst.parse_module(NPU_FLAG)) == {"NPU_ATTN": False}
    assert module_flags(cst.parse_module(source)) == {}


def test_a_count_bound_more_than_once_is_not_decided():
    import libcst as cst

    from porter.rewrites.statement_pruner import integers_bound_once

    function = cst.parse_statement(
        "def f(x):\n    n = 0\n    k = 0\n    for _ in x:\n        k += 1\n    y[n] = k\n    return n, k\n"
    )
    assert integers_bound_once(function) == {"n": 0}
