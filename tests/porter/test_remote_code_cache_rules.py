"""Rules on the ChatGLM2 remote code (tests/fixtures/remote_code/chatglm2): a layer reached through an
accessor method, a tuple cache under the engine's own parameter names, and a backbone whose tuple
result is unpacked into names the port no longer returns. Before: the file's code; after: what the
pipeline's prefix leaves."""

from __future__ import annotations

from pathlib import Path

import libcst as cst
import pytest

from porter.analysis.attention import analyse_attention, hand_repetitions
from porter.analysis.model_index import build_index
from tests.porter.rewrite_helpers import method_code, normalize, run_through

CHATGLM2 = (
    Path(__file__).resolve().parent.parent / "fixtures" / "remote_code" / "chatglm2" / "modeling_chatglm.py"
)


@pytest.fixture(scope="module")
def source():
    return CHATGLM2.read_text()


@pytest.fixture(scope="module")
def plumbing(source):
    return run_through(source, "hf-plumbing", module=None)


@pytest.fixture(scope="module")
def dead_code_removed(source):
    return run_through(source, "dead-code", module=None).code


def test_an_accessor_returning_an_item_of_the_layer_list_is_written_out(source, plumbing):
    # `def _get_layer(self, layer_number): return self.layers[layer_number]`; `layer = self._get_layer(index)`
    assert "layer = self._get_layer(index)" in source
    forward = method_code(plumbing.code, "GLMTransformer", "forward")
    assert "layer = self.layers[index]" in forward and "_get_layer" not in forward


def test_a_tuple_cache_under_the_engines_names_is_recognised_and_renamed_apart(source, plumbing):
    # SelfAttention: `cache_k, cache_v = kv_cache`; `key_layer = torch.cat((cache_k, key_layer), dim=0)`;
    # GLMBlock threads `kv_cache=kv_cache`, GLMTransformer passes `kv_cache=kv_caches[index]`.
    assert "cache_k, cache_v = kv_cache" in source
    assert plumbing.context.plan.cache_inputs["SelfAttention"] == {"source_kv_cache"}
    assert plumbing.context.plan.cache_inputs["GLMBlock"] == {"source_kv_cache"}
    assert plumbing.context.plan.cache_inputs["GLMTransformer"] == {"source_kv_caches"}
    assert "cache_k, cache_v = source_kv_cache" in method_code(plumbing.code, "SelfAttention", "forward")


def test_the_sources_cache_branch_goes_and_the_engines_cache_is_passed(dead_code_removed):
    attention = method_code(dead_code_removed, "SelfAttention", "forward")
    assert "torch.cat" not in attention and "source_kv_cache" not in attention
    assert normalize(attention).startswith(
        "def forward(self, hidden_states, rotary_pos_emb, kv_cache, input_metadata):"
    )
    layers = normalize(method_code(dead_code_removed, "GLMTransformer", "forward"))
    assert "layer_ret = layer(hidden_states, rotary_pos_emb, kv_caches[index], input_metadata)" in layers
    assert "hidden_states = layer_ret\n" in layers
    assert "source_kv_caches" not in layers


def test_names_a_tuple_result_was_unpacked_into_besides_the_tensor_go_with_their_reads(
    source, dead_code_removed
):
    # `hidden_states, presents, all_hidden_states, all_self_attentions = self.encoder(...)`, then
    # `return tuple(v for v in [hidden_states, presents, all_hidden_states, all_self_attentions] if ...)`
    assert "hidden_states, presents, all_hidden_states, all_self_attentions = self.encoder(" in source
    model = normalize(method_code(dead_code_removed, "ChatGLMModel", "forward"))
    assert "hidden_states = self.encoder(" in model
    assert "presents" not in model and "all_self_attentions" not in model
    assert model.rstrip().endswith("return hidden_states")


def test_a_fused_size_set_then_overridden_under_a_flag_gives_kv_heads_by_that_flag():
    # `self.qkv_hidden_size = 3 * self.projection_size`; `if self.multi_query_attention:
    # self.qkv_hidden_size = self.projection_size + 2 * self.hidden_size_per_attention_head * config.multi_query_group_num`
    info = analyse_attention(build_index(cst.parse_module(CHATGLM2.read_text())), "SelfAttention")
    assert (info.query, info.key, info.value, info.output) == ("query_key_value",) * 3 + ("dense",)
    assert info.head_dim == "self.hidden_size_per_attention_head"
    assert info.num_heads == "config.num_attention_heads"
    assert info.num_kv_heads == (
        "(config.multi_query_group_num if self.multi_query_attention else config.num_attention_heads)"
    )


def test_a_kv_head_repetition_written_step_by_step_goes_before_the_paged_call(source, dead_code_removed):
    # `key_layer = key_layer.unsqueeze(-2)`; `key_layer = key_layer.expand(-1, -1, -1, H // G, -1)`;
    # `key_layer = key_layer.contiguous().view(...)`, the same for value_layer, under `if self.multi_query_attention:`
    assert "key_layer = key_layer.unsqueeze(-2)" in source
    attention = normalize(method_code(dead_code_removed, "SelfAttention", "forward"))
    assert ".unsqueeze(" not in attention and ".expand(" not in attention
    assert "self.attn(query_layer, key_layer, value_layer, kv_cache, input_metadata)" in attention
    assert "part.unflatten(-1, (-1, self.hidden_size_per_attention_head))" in attention  # the split stays


def test_a_view_alone_is_no_hand_repetition():
    statements = [cst.parse_statement("k = k.view(s, b, h, d)"), cst.parse_statement("v = v.contiguous()")]
    assert hand_repetitions(statements, {"k", "v"}) == set()


def test_an_input_only_a_task_head_passes_the_backbone_goes(source, dead_code_removed):
    # ChatGLMForSequenceClassification passes `full_attention_mask=full_attention_mask`; the causal
    # LM never does, and reads `self.transformer.output_layer` (a member, not a use of the module).
    assert "full_attention_mask=full_attention_mask," in source
    model = normalize(method_code(dead_code_removed, "ChatGLMModel", "forward"))
    assert model.startswith(
        "def forward(self, input_ids, positions: Optional[torch.Tensor], kv_caches, input_metadata):"
    )


def test_a_layer_stack_run_below_the_embedding_takes_no_input_ids(dead_code_removed):
    # GLMTransformer.forward(self, hidden_states, attention_mask, rotary_pos_emb, kv_caches=None, ...),
    # run by ChatGLMModel.forward(self, input_ids, ...) after `self.embedding(input_ids)`.
    layers = normalize(method_code(dead_code_removed, "GLMTransformer", "forward"))
    assert layers.startswith(
        "def forward(self, hidden_states, rotary_pos_emb, positions, kv_caches, input_metadata):"
    )


@pytest.fixture(scope="module")
def fused(source):
    return run_through(source, "fuse-qkv", module=None).code


def test_an_if_else_splitting_q_k_v_in_two_layouts_loads_by_the_same_test(source, fused):
    # `if self.multi_query_attention:` `mixed_x_layer.split([H * d, G * d, G * d], dim=-1)` (all
    # queries, keys, values); else a view into `(H, 3 * d)` cut in three by `split_tensor_along_last_dim`.
    assert "split_tensor_along_last_dim(mixed_x_layer, 3)" in source
    forward = normalize(method_code(fused, "SelfAttention", "forward"))
    assert "split_tensor_along_last_dim" not in forward and "if self.multi_query_attention" not in forward
    assert "mixed_x_layer.split(" in forward and "self.query_key_value.q_size" in forward
    init = "".join(normalize(method_code(fused, "SelfAttention", "__init__")).split()).replace('"', "'")
    assert (
        "self.query_key_value=QKVParallelLinear(config.hidden_size,self.hidden_size_per_attention_head"
        in init
    )
    assert "checkpoint_layout='concatenated'ifself.multi_query_attentionelse'per_head'" in init
