"""prune: top-level classes, functions and assignments the causal LM does not reach go."""

from __future__ import annotations

from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    import_block,
    run_rewrites,
    top_level_names,
    vary,
)

TASK_HEAD = """

class MiniForSequenceClassification(MiniPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = MiniModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids=None, **kwargs):
        return self.score(self.model(input_ids, **kwargs).last_hidden_state)


__all__ = ["MiniForCausalLM", "MiniModel", "MiniForSequenceClassification"]
"""


def test_task_heads_and_all_go():
    after = run_rewrites(MINI_MODEL + TASK_HEAD, "prune")
    assert "MiniForSequenceClassification" not in top_level_names(after.code)
    assert "__all__" not in after.code
    assert "prune | module | MiniForSequenceClassification" in [
        f"{c.rule} | {c.where} | {c.before}" for c in after.context.changes
    ]


def test_everything_the_causal_lm_reaches_stays_in_file_order():
    after = run_rewrites(MINI_MODEL + TASK_HEAD, "prune")
    assert top_level_names(after.code) == [
        "eager_attention_forward",
        "MiniMLP",
        "MiniAttention",
        "MiniDecoderLayer",
        "MiniPreTrainedModel",
        "MiniModel",
        "MiniForCausalLM",
        "build_causal_mask",
    ]


def test_eager_attention_function_goes_once_paged_attention_replaced_its_use():
    after = run_rewrites(MINI_MODEL, "paged-attention", "prune")
    assert "eager_attention_forward" not in top_level_names(after.code)


def test_mask_builder_goes_once_dead_code_removed_its_call():
    after = run_rewrites(MINI_MODEL, "engine-interface", "dead-code", "prune")
    assert "build_causal_mask" not in top_level_names(after.code)


def test_helpers_reached_through_other_helpers_stay_and_unreached_ones_go():
    before = vary(
        MINI_MODEL,
        "def build_causal_mask(attention_mask, inputs_embeds):\n    return attention_mask\n",
        "def build_causal_mask(attention_mask, inputs_embeds):\n    return expand_mask(attention_mask)\n\n\n"
        "def expand_mask(mask):\n    return mask[:, None] * MASK_SCALE\n\n\n"
        "def unused_helper(x):\n    return x\n\n\n"
        "MASK_SCALE = 1.0\nUNUSED_CONSTANT = 2\n",
    )
    after = run_rewrites(before, "prune")
    names = top_level_names(after.code)
    assert {"build_causal_mask", "expand_mask"} <= set(names)
    assert "unused_helper" not in names
    assert "MASK_SCALE = 1.0" in after.code
    assert "UNUSED_CONSTANT" not in after.code


def test_module_logger_read_by_kept_code_stays():
    before = vary(
        MINI_MODEL,
        "\n\ndef eager_attention_forward(",
        "\nlogger = logging.get_logger(__name__)\n\n\ndef eager_attention_forward(",
    )
    before = vary(
        before,
        "        self.post_init()\n\n    @auto_docstring",
        "        logger.info('built')\n        self.post_init()\n\n    @auto_docstring",
    )
    after = run_rewrites(before, "prune")
    assert "logger = logging.get_logger(__name__)" in after.code


def test_imports_are_left_to_the_imports_rewrite():
    after = run_rewrites(MINI_MODEL + TASK_HEAD, "paged-attention", "prune")
    assert import_block(after.code) == import_block(MINI_MODEL)
