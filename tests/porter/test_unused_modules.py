"""unused-modules: a module the port never runs goes, and load_weights skips its checkpoint tensors;
an input a module's forward reads only in a branch the engine decided away goes from its signature."""

from __future__ import annotations

from porter.analysis.source import locate
from tests.porter.rewrite_helpers import MINI_MODEL, class_code, method_code, run_through, vary


def test_a_module_nothing_runs_goes_and_its_weights_are_skipped():
    source = vary(
        MINI_MODEL,
        "        self.mlp = MiniMLP(config)\n",
        "        self.mlp = MiniMLP(config)\n        self.cross_mlp = MiniMLP(config)\n",
    )
    after = run_through(source, "load-weights")
    init = method_code(after.code, "MiniDecoderLayer", "__init__")
    assert "cross_mlp" not in init and "self.mlp = MiniMLP(config)" in init
    load = class_code(after.code, "MiniForCausalLM").split("def __init__")[0]  # its weight tables
    assert "ignored_weights = [" in load
    assert "'(^|\\\\.)cross_mlp\\\\.'" in load or '"(^|\\\\.)cross_mlp\\\\."' in load, load
    assert after.changes("unused-modules") == ["self.cross_mlp = MiniMLP(config) -> "]


def test_a_module_built_with_a_dropout_rate_is_not_taken_for_the_rate():
    source = vary(
        MINI_MODEL,
        "        self.mlp = MiniMLP(config)\n",
        "        self.mlp = MiniMLP(config)\n        self.cross_mlp = MiniMLP(config, dropout=0.1)\n",
    )
    after = run_through(source, "strip-training")
    assert "self.cross_mlp = MiniMLP(config, dropout=0.1)" in method_code(
        after.code, "MiniDecoderLayer", "__init__"
    )


def test_an_input_read_only_where_the_engine_gives_positions_goes():
    # BART's learned position embedding reads `input_ids` only for the batch's shape, in the branch
    # that runs when no positions are given; the engine always gives them.
    bart = locate("bart")
    after = run_through(bart.text, "engine-interface", module=bart.module)
    forward = method_code(after.code, "BartLearnedPositionalEmbedding", "forward")
    assert (
        forward.replace("\n", "")
        .replace("    ", "")
        .startswith("def forward(self, positions: torch.Tensor | None):")
    )
    assert "input_ids" not in forward
    assert "self.embed_positions(positions)" in method_code(after.code, "BartDecoder", "forward")
