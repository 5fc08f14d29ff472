"""imports: relative imports made absolute, unused ones gone, the engine's layers imported, sorted."""

from __future__ import annotations

import ast

import engine.layers
from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    REWRITE_NAMES,
    assert_code,
    import_block,
    run_rewrites,
    run_through,
    vary,
)

SOURCE_IMPORTS = """\
from ...activations import ACT2FN
from ...generation import GenerationMixin
from ...modeling_layers import GradientCheckpointingLayer
from ...modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from ...modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from ...utils import auto_docstring
"""


def test_relative_imports_resolve_against_the_source_module():
    after = run_rewrites(MINI_MODEL, "imports")
    assert_code(
        import_block(after.code),
        """
        import torch
        from torch import nn
        from transformers.activations import ACT2FN
        from transformers.generation import GenerationMixin
        from transformers.modeling_layers import GradientCheckpointingLayer
        from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
        from transformers.utils import auto_docstring
        """,
    )


def test_sibling_module_imports_resolve_inside_the_model_package():
    before = vary(
        MINI_MODEL,
        "from torch import nn\n",
        "from torch import nn\nfrom .configuration_mini import MiniConfig\nfrom . import mini_utils\n",
    )
    before = vary(
        before,
        "        self.layer_idx = layer_idx\n",
        "        self.layer_idx = layer_idx\n        self.config_class = MiniConfig\n        self.utils = mini_utils\n",
    )
    after = run_rewrites(before, "imports")
    block = import_block(after.code)
    assert "from transformers.models.mini.configuration_mini import MiniConfig\n" in block
    assert "from transformers.models.mini import mini_utils\n" in block


def test_unused_imports_and_unused_names_go():
    before = vary(
        MINI_MODEL,
        "import torch\nfrom torch import nn\n",
        "import math\nimport torch\nimport torch.nn.functional as F\nfrom torch import Tensor, nn\n",
    )
    before = vary(
        before, "from ...utils import auto_docstring", "from ...utils import auto_docstring, logging"
    )
    after = run_rewrites(before, "imports")
    block = import_block(after.code)
    assert "import math" not in block
    assert "torch.nn.functional" not in block
    assert "from torch import nn\n" in block
    assert "from transformers.utils import auto_docstring\n" in block


def test_imports_nothing_reads_after_earlier_rewrites_go():
    after = run_rewrites(MINI_MODEL, "hf-plumbing", "imports")
    block = import_block(after.code)
    for gone in ("GenerationMixin", "GradientCheckpointingLayer", "PreTrainedModel", "auto_docstring"):
        assert gone not in block
    assert "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n" in block


def test_engine_layers_are_imported_sorted_after_the_source_imports():
    after = run_rewrites(MINI_MODEL, "tensor-parallel", "imports")
    block = import_block(after.code)
    assert block.endswith(
        "from transformers.utils import auto_docstring\n"
        "from engine.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, VocabParallelEmbedding\n"
    )
    # ...and before the first line of code.
    assert after.code.index("from engine.layers import") < after.code.index("def eager_attention_forward")


def test_engine_imports_from_several_modules_get_a_line_each():
    after = run_rewrites(MINI_MODEL, "paged-attention", "fuse-qkv", "load-weights", "imports")
    engine_lines = [line for line in import_block(after.code).splitlines() if line.startswith("from engine")]
    assert engine_lines == [
        "from engine.layers import PagedAttention, QKVParallelLinear",
        "from engine.weights import load_named_weights",
    ]


def test_module_docstring_stays_first():
    after = run_rewrites('"""The mini model."""\n\n' + MINI_MODEL, "tensor-parallel", "imports")
    assert after.code.startswith('"""The mini model."""\n')


def test_relative_import_in_a_file_outside_transformers_is_a_review_item():
    after = run_rewrites(MINI_MODEL, "imports", module=None)
    assert after.review_messages()[0] == (
        "imports @ module: relative import `from ...activations import ACT2FN` in a file outside transformers"
    )
    assert len(after.review_messages()) == len(SOURCE_IMPORTS.splitlines())
    assert "from ...activations import ACT2FN\n" in import_block(after.code)


def _imported_and_read(code: str) -> tuple[set[str], set[str]]:
    tree = ast.parse(code)
    imported: set[str] = set()
    read: set[str] = set()
    for statement in tree.body:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in statement.names}
        else:
            read |= {node.id for node in ast.walk(statement) if isinstance(node, ast.Name)}
    return imported, read


def test_after_the_whole_pipeline_imports_are_absolute_used_and_complete():
    after = run_through(MINI_MODEL, REWRITE_NAMES[-1])
    compile(after.code, "mini.py", "exec")
    assert "from ." not in import_block(after.code)
    imported, read = _imported_and_read(after.code)
    assert imported <= read, f"imported but unused: {imported - read}"
    engine_names = set(engine.layers.__all__) | {"load_named_weights"}
    assert read & engine_names <= imported, f"used but not imported: {(read & engine_names) - imported}"
    assert {"PagedAttention", "QKVParallelLinear", "ParallelLMHead", "load_named_weights"} <= imported
