"""Plumbing of transformers 4.3x modeling files, each test on a snippet of a real 4.36.2 file
(tests/fixtures/transformers_4_3x/4.36.2/<arch>/modeling_<arch>.py, lines given per test) set into
the mini model: deprecated keyword arguments, framework registries, a recorded backend choice, the
rotation written just before an inline core, a sliding window cut into the backbone's mask."""

from __future__ import annotations

from pathlib import Path

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    method_code,
    replace_method,
    run_rewrites,
    run_through,
    vary,
)


def test_a_warning_about_padding_mask_in_kwargs_goes_with_the_kwargs():
    # llama/modeling_llama.py 786-789 (LlamaDecoderLayer.forward)
    before = replace_method(
        MINI_MODEL,
        "MiniDecoderLayer",
        "forward",
        """
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
            if "padding_mask" in kwargs:
                warnings.warn(
                    "Passing `padding_mask` is deprecated and will be removed in v4.37. Please make sure use `attention_mask` instead.`"
                )
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
            return hidden_states
        """,
    )
    after = run_through(before, "dead-code")
    assert after.review_messages() == []
    forward = method_code(after.code, "MiniDecoderLayer", "forward")
    assert "padding_mask" not in forward and "warnings" not in forward
    assert after.changes("dead-code", "MiniDecoderLayer.forward")


def test_deprecated_arguments_popped_and_counted_are_decided_on_an_empty_mapping():
    # bloom/modeling_bloom.py 634-642 (BloomModel.forward)
    checks = """
            if deprecated_arguments.pop("position_ids", False) is not False:
                warnings.warn("`position_ids` have no functionality in BLOOM", FutureWarning)
            if len(deprecated_arguments) > 0:
                raise ValueError(f"Got unexpected arguments: {deprecated_arguments}")
    """
    before = replace_method(
        MINI_MODEL,
        "MiniModel",
        "forward",
        f"""
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **deprecated_arguments):
{checks}
            inputs_embeds = self.embed_tokens(input_ids)
            hidden_states = inputs_embeds
            for decoder_layer in self.layers:
                hidden_states = decoder_layer(hidden_states, attention_mask=attention_mask)
            hidden_states = self.norm(hidden_states)
            return hidden_states
        """,
    )
    after = run_rewrites(before, "decide-conditions")
    assert after.review_messages() == []
    forward = method_code(after.code, "MiniModel", "forward")
    assert "deprecated_arguments.pop" not in forward
    assert "raise ValueError" not in forward


def test_a_membership_test_of_anything_but_the_keyword_mapping_is_not_decided():
    before = replace_method(
        MINI_MODEL,
        "MiniMLP",
        "forward",
        """
        def forward(self, x, **kwargs):
            if "scale" in self.options:
                x = x * self.options["scale"]
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        """,
    )
    after = run_rewrites(before, "decide-conditions")
    assert 'if "scale" in self.options:' in method_code(after.code, "MiniMLP", "forward")


def test_a_class_registered_in_a_framework_registry_is_not_registered_in_the_port():
    # llama/modeling_llama.py 41 and 120: `from ...pytorch_utils import ALL_LAYERNORM_LAYERS`, then
    # `ALL_LAYERNORM_LAYERS.append(LlamaRMSNorm)` after the class.
    before = vary(
        MINI_MODEL,
        "from ...utils import auto_docstring\n",
        "from ...pytorch_utils import ALL_LAYERNORM_LAYERS\nfrom ...utils import auto_docstring\n",
    )
    before = vary(
        before,
        "class MiniAttention(nn.Module):",
        "ALL_LAYERNORM_LAYERS.append(MiniMLP)\n\n\nclass MiniAttention(nn.Module):",
    )
    local = vary(
        before,
        "ALL_LAYERNORM_LAYERS.append(MiniMLP)",
        "ALL_LAYERNORM_LAYERS.append(MiniMLP)\nLOCAL = []\nLOCAL.append(MiniMLP)",
    )
    after = run_rewrites(local, "hf-plumbing")
    assert "ALL_LAYERNORM_LAYERS.append" not in after.code
    assert "LOCAL.append(MiniMLP)" in after.code  # a list of the file's own is left alone
    assert after.changes("hf-plumbing", "module")


def test_an_attribute_recording_the_sdpa_choice_holds_false_and_its_branch_goes():
    # falcon/modeling_falcon.py 289 (`self._use_sdpa = config._attn_implementation == "sdpa"`) and
    # 458-468, the branch it picks.
    before = vary(
        MINI_MODEL,
        "        self.attention_dropout = config.attention_dropout\n",
        '        self.attention_dropout = config.attention_dropout\n        self._use_sdpa = config._attn_implementation == "sdpa"\n',
    )
    before = vary(
        before,
        "        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(",
        "        if self._use_sdpa:\n"
        "            attn_output = F.scaled_dot_product_attention(query_states, key_states, value_states, attention_mask)\n"
        "            return attn_output, None\n"
        "        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(",
    )
    after = run_rewrites(before, "decide-conditions")
    forward = method_code(after.code, "MiniAttention", "forward")
    assert "scaled_dot_product_attention" not in forward
    assert "attention_interface(" in forward


LLAMA_4_36_ATTENTION = """
def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, **kwargs):
    bsz, q_len, _ = hidden_states.size()
    query_states = self.q_proj(hidden_states)
    key_states = self.k_proj(hidden_states)
    value_states = self.v_proj(hidden_states)

    query_states = query_states.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
    key_states = key_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    value_states = value_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)

    kv_seq_len = key_states.shape[-2]
    cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)

    key_states = repeat_kv(key_states, self.num_key_value_groups)
    value_states = repeat_kv(value_states, self.num_key_value_groups)

    attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attn_output = torch.matmul(attn_weights, value_states)

    attn_output = attn_output.transpose(1, 2).contiguous()
    attn_output = attn_output.reshape(bsz, q_len, self.hidden_size)
    attn_output = self.o_proj(attn_output)
    return attn_output, None, past_key_value
"""


def _llama_4_36_attention() -> str:
    source = replace_method(MINI_MODEL, "MiniAttention", "forward", LLAMA_4_36_ATTENTION)
    source = vary(
        source,
        "        self.attention_dropout = config.attention_dropout\n",
        "        self.attention_dropout = config.attention_dropout\n"
        "        self.hidden_size = config.hidden_size\n"
        "        self.num_heads = config.num_attention_heads\n"
        "        self.num_key_value_heads = config.num_key_value_heads\n"
        "        self.num_key_value_groups = self.num_heads // self.num_key_value_heads\n",
    )
    return source


def test_the_rotation_before_an_inline_core_stays_outside_the_paged_call():
    # llama/modeling_llama.py 351-452 (LlamaAttention.forward, eager; cache plumbing left out)
    after = run_rewrites(_llama_4_36_attention(), "decide-conditions", "paged-attention")
    assert_code(
        method_code(after.code, "MiniAttention", "forward"),
        """
        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None, **kwargs):
            bsz, q_len, _ = hidden_states.size()
            query_states = self.q_proj(hidden_states)
            key_states = self.k_proj(hidden_states)
            value_states = self.v_proj(hidden_states)

            kv_seq_len = key_states.shape[-2]
            cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
            attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata).flatten(1)
            attn_output = self.o_proj(attn_output)
            return attn_output, None, past_key_value
        """,
    )


def test_a_window_cut_into_the_backbones_mask_becomes_the_paged_attentions_window():
    # mistral/modeling_mistral.py 908-914 (MistralModel.forward builds the 4-D mask with the window)
    before = vary(
        _llama_4_36_attention(),
        "        causal_mask = build_causal_mask(attention_mask, inputs_embeds)\n",
        "        causal_mask = build_causal_mask(\n"
        "            attention_mask, inputs_embeds, sliding_window=self.config.sliding_window\n"
        "        )\n",
    )
    before = vary(
        before,
        "def build_causal_mask(attention_mask, inputs_embeds):",
        "def build_causal_mask(attention_mask, inputs_embeds, sliding_window=None):",
    )
    after = run_rewrites(before, "decide-conditions", "paged-attention")
    init = method_code(after.code, "MiniAttention", "__init__")
    assert "sliding_window=config.sliding_window" in init
    without = run_rewrites(_llama_4_36_attention(), "decide-conditions", "paged-attention")
    assert "sliding_window" not in method_code(without.code, "MiniAttention", "__init__")


FIXTURES_4_36 = Path(__file__).resolve().parents[1] / "fixtures" / "transformers_4_3x" / "4.36.2"


def _rotary_of_4_36(arch: str):
    source = (FIXTURES_4_36 / arch / f"modeling_{arch}.py").read_text()
    return run_rewrites(source, "decide-conditions", "paged-attention", "rotary", module=None)


def test_a_size_read_off_the_replaced_rotary_module_is_what_it_was_built_with():
    # phi/modeling_phi.py 261-265 builds `PhiRotaryEmbedding(int(self.partial_rotary_factor *
    # self.head_dim), ...)` (in every branch of `_init_rope`), 342-347 slice q and k by its `.dim`.
    after = _rotary_of_4_36("phi")
    forward = method_code(after.code, "PhiAttention", "forward")
    assert "rotary_emb.dim" not in forward
    assert "query_states[..., : int(self.partial_rotary_factor * self.head_dim)]" in forward
    assert "self.partial_rotary_factor = config.partial_rotary_factor" in method_code(
        after.code, "PhiAttention", "__init__"
    )


def test_a_rope_helper_called_under_a_config_test_goes_with_its_test():
    # falcon/modeling_falcon.py 297-298: `if config.rotary: self._init_rope()`, 317-342 the helper.
    after = _rotary_of_4_36("falcon")
    init = method_code(after.code, "FalconAttention", "__init__")
    assert "_init_rope" not in after.code.split("class FalconAttention", 1)[1].split("\nclass ", 1)[0]
    assert "if config.rotary" not in init


def _decided_4_36(arch: str, *more: str):
    source = (FIXTURES_4_36 / arch / f"modeling_{arch}.py").read_text()
    return run_rewrites(source, "decide-conditions", *more, module=None)


def test_heads_split_by_a_reshaping_helper_leave_the_projection_for_the_paged_call():
    # opt/modeling_opt.py 200: `key_states = self._shape(self.k_proj(hidden_states), -1, bsz)`;
    # 214: `query_states = self._shape(query_states, tgt_len, bsz).view(*proj_shape)`.
    forward = method_code(_decided_4_36("opt", "paged-attention").code, "OPTAttention", "forward")
    assert "self._shape(" not in forward
    assert "key_states = self.k_proj(hidden_states)" in forward
    assert "value_states = self.v_proj(hidden_states)" in forward
    assert (
        "attn_output = self.attn(query_states, key_states, value_states, kv_cache, input_metadata)" in forward
    )


def test_an_attribute_only_an_uncalled_api_changes_keeps_its_constructor_literal():
    # gpt2/modeling_gpt2.py 679 (`self.model_parallel = False`, set True only by `parallelize()`)
    # and 862-867, the device moves it guards inside the layer loop.
    forward = method_code(_decided_4_36("gpt2").code, "GPT2Model", "forward")
    assert "model_parallel" not in forward
    assert "for i, (block, layer_past) in enumerate(zip(self.h, past_key_values)):" in forward


def test_an_element_of_a_per_layer_placeholder_of_nones_is_none():
    # bloom/modeling_bloom.py 660-661 (`past_key_values = tuple([None] * len(self.h))`) and 688-689
    # (`if past_key_values[0] is not None:`).
    after = _decided_4_36("bloom")
    forward = method_code(after.code, "BloomModel", "forward")
    assert "past_key_values[0] is not None" not in forward
    assert "past_key_values[0][0].shape[2]" not in forward
    assert not [m for m in after.review_messages() if "BloomModel" in m]


def test_a_helpers_head_merge_sized_by_the_models_heads_infers_its_width():
    # gpt2/modeling_gpt2.py 282-288 (`_merge_heads`: `new_shape = tensor.size()[:-2] + (num_heads *
    # attn_head_size,)`, called with the model's head count, 333): a rank holds half the heads at tp=2.
    after = _decided_4_36("gpt2", "paged-attention", "flatten-batch")
    helper = method_code(after.code, "GPT2Attention", "_merge_heads")
    assert "new_shape = tensor.size()[:-2] + (-1,)" in helper
    assert "num_heads * attn_head_size" not in helper
