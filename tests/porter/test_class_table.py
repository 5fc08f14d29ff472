"""class-table: a submodule picked from a table of backend classes is built as the class they share."""

from __future__ import annotations

import libcst as cst

from porter.analysis.model_index import build_index
from tests.porter.config_variant_model import VARIANT_MODEL
from tests.porter.rewrite_helpers import init_value, run_rewrites, run_through, top_level_names, vary


def test_the_table_call_builds_the_class_every_entry_derives_from():
    after = run_rewrites(VARIANT_MODEL, "class-table")
    assert init_value(after.code, "MiniDecoderLayer", "self_attn") == "MiniAttention(config, layer_idx)"
    assert after.changes("class-table") == [
        "MINI_ATTENTION_CLASSES[config._attn_implementation] -> MiniAttention"
    ]


def test_the_index_links_the_table_call_so_attention_is_found_before_any_rewrite():
    index = build_index(cst.parse_module(VARIANT_MODEL))
    assert index.class_tables == {"MINI_ATTENTION_CLASSES": "MiniAttention"}
    assert index.classes["MiniDecoderLayer"].submodules["self_attn"] == "MiniAttention"
    assert "MiniAttention" in index.attention


def test_a_table_whose_entries_share_no_class_is_left_alone():
    unrelated = vary(
        VARIANT_MODEL, "class MiniFlashAttention2(MiniAttention):", "class MiniFlashAttention2(nn.Module):"
    )
    index = build_index(cst.parse_module(unrelated))
    assert index.class_tables == {}
    after = run_rewrites(unrelated, "class-table")
    assert init_value(after.code, "MiniDecoderLayer", "self_attn") == (
        "MINI_ATTENTION_CLASSES[config._attn_implementation](config, layer_idx)"
    )


def test_the_table_and_the_other_backends_are_pruned():
    names = top_level_names(run_through(VARIANT_MODEL, "prune").code)
    assert "MiniAttention" in names
    assert "MiniFlashAttention2" not in names
    assert "MINI_ATTENTION_CLASSES" not in run_through(VARIANT_MODEL, "prune").code


# MiniCPM's: a sparse-attention class behind a config setting, whose constructor needs flash-attention.
SPARSE_ATTENTION = """

class MiniSparseAttention(MiniAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.config._attn_implementation == "flash_attention_2", "Only flash_attention_2 is supported"

    def forward(self, hidden_states, alibi, attention_mask=None, past_key_values=None, **kwargs):
        raise NotImplementedError
"""

SPARSE_CHOICE = """        if config.sparse_config is not None and torch.cuda.is_available():
            self.self_attn = MiniSparseAttention(config=config, layer_idx=layer_idx)
        else:
            self.self_attn = MINI_ATTENTION_CLASSES[config._attn_implementation](config, layer_idx)
"""


def _with_sparse(assertion: str = 'self.config._attn_implementation == "flash_attention_2"') -> str:
    source = vary(
        VARIANT_MODEL, "\n\nclass MiniDecoderLayer(", SPARSE_ATTENTION + "\n\nclass MiniDecoderLayer("
    )
    source = vary(source, 'self.config._attn_implementation == "flash_attention_2"', assertion)
    return vary(
        source,
        "        self.self_attn = MINI_ATTENTION_CLASSES[config._attn_implementation](config, layer_idx)\n",
        SPARSE_CHOICE,
    )


def test_a_branch_building_a_class_that_asserts_another_backend_goes():
    after = run_rewrites(_with_sparse(), "class-table")
    assert init_value(after.code, "MiniDecoderLayer", "self_attn") == "MiniAttention(config, layer_idx)"
    assert "if config.sparse_config" not in after.code
    pruned = run_through(_with_sparse(), "prune")
    assert "MiniSparseAttention" not in top_level_names(pruned.code)


def test_a_branch_building_a_class_that_asserts_the_eager_backend_stays():
    after = run_rewrites(_with_sparse('self.config._attn_implementation == "eager"'), "class-table")
    assert "if config.sparse_config is not None and torch.cuda.is_available():" in after.code
