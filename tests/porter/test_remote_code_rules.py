"""Rules that Hub remote code needs, each on the snippet of the corpus file that shows it (tests/
fixtures/remote_code): before (the file's own code) and after (what porter reads or writes)."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import libcst as cst
import pytest

from porter.analysis.attention import analyse_attention, imported_names, repeats_heads
from porter.analysis.mask_windows import extra_window_keys, widened
from porter.analysis.model_index import build_index
from porter.rewrites.hf_plumbing import StripHFPlumbing
from porter.rewrites.tensor_parallel import per_head_modules
from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    assert_code,
    make_context,
    method_code,
    replace_method,
    run_rewrites,
    run_through,
)

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "remote_code"


@functools.lru_cache(maxsize=8)
def _index(directory: str, file: str):
    return build_index(cst.parse_module((CORPUS / directory / file).read_text()))


def _statement(code: str) -> cst.SimpleStatementLine:
    return cst.parse_statement(code)


# --- q/k/v traced into an inline core --------------------------------------------------------------


def test_a_rotary_helper_on_feature_slices_is_traced_argument_by_argument():
    # StableLM-Epoch: `query_states, key_states = apply_rotary_pos_emb(query_rot, key_rot, cos, sin,
    # position_ids)`: each target follows its own argument, not cos/sin back to value_states.
    info = analyse_attention(_index("stablelm_epoch", "modeling_stablelm_epoch.py"), "Attention")
    assert (info.query, info.key, info.value) == ("q_proj", "k_proj", "v_proj")
    assert info.head_dim == "self.head_dim"


def test_the_head_split_of_q_and_k_stays_where_their_features_are_sliced():
    # `query_states = query_states.view(bsz, q_len, H, D).transpose(1, 2)` then `query_states[...,
    # : self.rotary_ndims]`: the slice is per head only on the split; v's split still goes.
    index = _index("stablelm_epoch", "modeling_stablelm_epoch.py")
    info = analyse_attention(index, "Attention")
    forward = index.classes["Attention"].methods["forward"]
    relayouts = [cst.Module([]).code_for_node(forward.body.body[i]).strip() for i in info.inline_relayouts]
    assert relayouts == [
        "value_states = value_states.view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)"
    ]


def test_score_operands_upcast_for_the_product_are_q_and_k():
    # Phi-2: `torch.matmul(query_states.to(torch.float32), key_states.to(torch.float32).transpose(2, 3))`
    info = analyse_attention(_index("phi2", "modeling_phi.py"), "PhiAttention")
    assert (info.query, info.key, info.value, info.output) == ("q_proj", "k_proj", "v_proj", "dense")
    assert info.core_args == ["query_states", "key_states", "value_states"]
    assert info.inline_scale == "1 / (math.sqrt(self.head_dim))"


def test_norms_one_head_wide_however_the_width_is_spelled_run_per_head():
    # Phi-2: `nn.LayerNorm(config.hidden_size // self.num_heads, ...)` beside `self.head_dim =
    # self.hidden_size // self.num_heads` and `self.hidden_size = config.hidden_size`.
    index = _index("phi2", "modeling_phi.py")
    info = index.classes["PhiAttention"]
    assert {"q_layernorm", "k_layernorm"} <= per_head_modules(info, analyse_attention(index, "PhiAttention"))


# --- KV-head repetition -----------------------------------------------------------------------------


def test_einops_repeat_as_the_file_imports_it_repeats_kv_heads():
    index = _index("yi", "modeling_yi.py")
    assert imported_names(index.module, {("einops", "repeat")}) == {"repeat"}
    statement = _statement(
        'key_states = repeat(key_states, f"b n h d -> b n (h {self.num_key_value_groups}) d")'
    )
    assert repeats_heads(statement.body[0].value, index)
    assert not repeats_heads(_statement("key_states = key_states.view(b, n, h, d)").body[0].value, index)


def test_imported_names_follow_aliases_and_module_imports():
    module = cst.parse_module("import einops as E\nfrom einops import repeat as rep\n")
    assert imported_names(module, {("einops", "repeat")}) == {"E.repeat", "rep"}


# --- flags probed from optional libraries ---------------------------------------------------------

FLAG_FORWARD = """
def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
    use_flash = is_flash_attn_2_available()
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape)
    key_states = self.k_proj(hidden_states).view(hidden_shape)
    value_states = self.v_proj(hidden_states).view(hidden_shape)
    if not use_flash:
        query_states = query_states.transpose(1, 2)
    query_states = scale_rows(query_states, use_flash)
    attn_output = self.o_proj(query_states)
    return attn_output, None
"""


def test_a_local_flag_probing_an_optional_library_is_false_and_its_reads_become_the_literal():
    # Yi: `flash_attn_available = is_flash_attn_2_available()`, tested by `if` and passed to the
    # rotary helper: the port imports no optional library.
    source = replace_method(MINI_MODEL, "MiniAttention", "forward", FLAG_FORWARD).replace(
        "from ...utils import auto_docstring",
        "from ...utils import auto_docstring, is_flash_attn_2_available",
    )
    code = run_rewrites(source, "decide-conditions").code
    forward = method_code(code, "MiniAttention", "forward")
    assert "use_flash" not in forward and "is_flash_attn_2_available" not in forward
    assert "query_states = query_states.transpose(1, 2)" in forward
    assert "query_states = scale_rows(query_states, False)" in forward


# --- module level ---------------------------------------------------------------------------------

OPTIONAL_IMPORT = """
_supports_window = False
try:
    from flash_attn import flash_attn_func

    _supports_window = True
except ImportError:
    if not _supports_window:
        print("no window")
"""


def test_module_level_code_that_stays_keeps_what_it_reads():
    # Phi-3: `_flash_supports_window_size = False` before a `try:` whose `except` reads it.
    source = MINI_MODEL.replace(
        "\n\ndef eager_attention_forward", OPTIONAL_IMPORT + "\n\ndef eager_attention_forward"
    )
    code = run_rewrites(source, "prune").code
    assert "_supports_window = False\ntry:" in code


def test_a_classmethod_of_a_stripped_framework_base_goes_with_it():
    # StableLM-Epoch ends with `StableLMEpochForCausalLM.register_for_auto_class("AutoModelForCausalLM")`.
    source = MINI_MODEL + '\n\nMiniForCausalLM.register_for_auto_class("AutoModelForCausalLM")\n'
    assert "register_for_auto_class" not in run_rewrites(source, "hf-plumbing").code


def test_a_module_level_call_of_the_files_own_method_stays():
    source = (
        MINI_MODEL.replace(
            "class MiniMLP(nn.Module):",
            "class MiniMLP(nn.Module):\n    @classmethod\n    def setup(cls):\n        pass\n",
        )
        + "\n\nMiniMLP.setup()\n"
    )
    assert "MiniMLP.setup()" in run_rewrites(source, "hf-plumbing").code


def test_remote_code_reads_token_ids_the_config_base_no_longer_sets_through_getattr():
    # StableLM-Epoch: `nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)`;
    # transformers 5's PretrainedConfig has no pad_token_id of its own.
    source = MINI_MODEL.replace(
        "nn.Embedding(config.vocab_size, config.hidden_size)",
        "nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)",
    )
    module, context = make_context(source, module=None)
    context.source = replace(context.source, siblings=("configuration_mini",))
    code = StripHFPlumbing().apply(module, context).code
    assert (
        'nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))' in code
    )
    _, tree_context = make_context(source)
    assert "config.pad_token_id)" in StripHFPlumbing().apply(cst.parse_module(source), tree_context).code


# --- sliding window of transformers' mask helper ----------------------------------------------------


def test_a_mask_helper_window_counts_one_more_key_from_4_39(tmp_path):
    # Phi-3's directory names 4.40.2; `_prepare_4d_causal_attention_mask(..., sliding_window=w)` of
    # that release keeps keys up to w back (w + 1 of them), 4.38's those up to w - 1 back.
    assert extra_window_keys(CORPUS / "phi3" / "modeling_phi3.py") == 1
    (tmp_path / "config.json").write_text(json.dumps({"transformers_version": "4.38.2"}))
    assert extra_window_keys(tmp_path / "modeling_x.py") == 0
    assert extra_window_keys(tmp_path / "elsewhere" / "modeling_x.py") == 0
    assert widened("config.sliding_window", 1) == (
        "config.sliding_window + 1 if config.sliding_window is not None else None"
    )
    assert widened("config.sliding_window", 0) == "config.sliding_window"


# --- whole rewrites on the corpus files (slower: the pipeline's prefix on a real file) ------------


@pytest.fixture(scope="module")
def yi_paged():
    return run_through((CORPUS / "yi" / "modeling_yi.py").read_text(), "paged-attention", module=None).code


def test_yi_attention_keeps_no_kv_repetition_and_no_flash_flag(yi_paged):
    forward = method_code(yi_paged, "YiAttention", "forward")
    assert "repeat(" not in forward and "flash_attn_available" not in forward
    assert "self.attn(query_states, key_states, value_states, kv_cache, input_metadata)" in forward


@pytest.fixture(scope="module")
def stablelm_rotary():
    source = (CORPUS / "stablelm_epoch" / "modeling_stablelm_epoch.py").read_text()
    return run_through(source, "rotary", module=None).code


def test_a_partial_rotary_takes_its_width_from_the_slices_and_a_helper_built_module_goes(stablelm_rotary):
    # `self.rotary_emb = RotaryEmbedding(self.rotary_ndims, ...)` in `_init_rope`, which also sets
    # `self.rotary_ndims`; q and k rotated on `[..., : self.rotary_ndims]`.
    assert_code(
        method_code(stablelm_rotary, "Attention", "_init_rope"),
        "def _init_rope(self):\n    self.rotary_ndims = int(self.head_dim * self.config.rope_pct)\n",
    )
    assert (
        "self.rotary_emb = get_rope(config, self.head_dim, rotary_dim=self.rotary_ndims, is_neox_style=True)"
        in method_code(stablelm_rotary, "Attention", "__init__")
    )


# --- a fused q|k|v viewed by a hard-coded head size, its heads folded into the batch (falcon_rw) ---


@pytest.fixture(scope="module")
def falcon_rw_source():
    return (CORPUS / "falcon_rw" / "modelling_RW.py").read_text()


def test_a_fused_qkv_viewed_by_a_literal_head_size_splits_grouped(falcon_rw_source):
    # `fused_qkv.view(batch, seq_len, -1, self.num_heads // self.num_kv + 2, 64)` in `_split_heads`:
    # per KV group its queries, one key, one value, each 64 wide.
    after = run_through(falcon_rw_source, "qkv-split-helper", module=None)
    assert after.context.plan.qkv_layouts == {("Attention", "query_key_value"): [("grouped", None)]}
    assert "self._split_heads(fused_qkv)" not in method_code(after.code, "Attention", "forward")


def test_a_fused_projection_sized_kv_times_two_plus_heads_becomes_a_qkv_parallel_linear(falcon_rw_source):
    # `Linear(self.hidden_size, (config.n_head_kv * 2 + config.n_head) * self.head_dim, ...)`
    assert "(config.n_head_kv * 2 + config.n_head) * self.head_dim" in falcon_rw_source
    code = run_through(falcon_rw_source, "fuse-qkv", module=None).code
    init = "".join(method_code(code, "Attention", "__init__").split())
    assert (
        "self.query_key_value=QKVParallelLinear(self.hidden_size,self.head_dim,config.n_head,"
        "config.n_head_kv,bias=config.bias,checkpoint_layout='grouped')"
    ) in init, init


def test_heads_folded_into_the_batch_stay_on_their_own_axis_in_per_token_rows(falcon_rw_source):
    # `query_layer.transpose(1, 2).reshape(batch_size * self.num_heads, q_length, self.head_dim)`,
    # back with `query_layer.reshape(batch_size, self.num_heads, -1, self.head_dim)` around the
    # attention core, the output merged by `x.reshape(batch_size, q_length, self.num_heads * self.head_dim)`.
    assert "reshape(batch_size * self.num_heads, q_length, self.head_dim)" in falcon_rw_source
    forward = method_code(
        run_through(falcon_rw_source, "flatten-batch", module=None).code, "Attention", "forward"
    )
    lines = {line.split("#")[0].strip() for line in forward.splitlines()}
    assert not [line for line in lines if "batch_size" in line or "q_length" in line], forward
    assert {"query_layer_ = query_layer", "value_layer_ = value_layer", "attn_output = x.flatten(1)"} <= lines


def test_a_rotary_module_rotating_q_and_k_itself_under_a_condition_becomes_an_optional_rope(falcon_rw_source):
    # `self.maybe_rotary = RotaryEmbedding(config.head_dim) if config.rotary else lambda q, k: (q, k)`;
    # `query_layer, key_layer = self.maybe_rotary(query_layer, key_layer)`, RotaryEmbedding.forward(q, k)
    # returning `(q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)`.
    code = run_through(falcon_rw_source, "rotary", module=None).code
    init = method_code(code, "Attention", "__init__")
    assert "maybe_rotary" not in init
    # its `cos_sin(seq_len, device="cuda", dtype=torch.bfloat16)`, called without a dtype, casts the
    # tables to bfloat16 whatever the model's dtype: the rope rounds them likewise
    assert (
        "self.rotary_emb=get_rope(config,self.head_dim,is_neox_style=True,table_dtype=torch.bfloat16)"
        "ifconfig.rotaryelseNone"
    ) in "".join(init.split()), init
    forward = method_code(code, "Attention", "forward")
    assert "self.maybe_rotary" not in forward
    lines = [line.strip() for line in forward.splitlines()]
    at = lines.index("if self.rotary_emb is not None:")
    assert lines[at + 1] == "query_layer, key_layer = self.rotary_emb(positions, query_layer, key_layer)", (
        forward
    )


def test_remote_code_declaring_no_tied_keys_ties_the_head_get_output_embeddings_returns(falcon_rw_source):
    # RWForCausalLM has no `_tied_weights_keys`; transformers 4 ties `get_output_embeddings()`'s
    # `self.lm_head` to the word embeddings while `tie_word_embeddings` (true by default) holds.
    tree, context = make_context(falcon_rw_source, module=None)
    context.source = replace(context.source, siblings=("configuration_RW",))
    StripHFPlumbing().apply(tree, context)
    assert context.plan.tied == {"lm_head.weight": ""}
    _, transformers_file = make_context(
        falcon_rw_source, module=None
    )  # not remote code: 5.x ties by keys only
    StripHFPlumbing().apply(tree, transformers_file)
    assert transformers_file.plan.tied == {}
