"""imports: relative imports made absolute, unused ones gone, the engine's layers imported, sorted."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import engine.layers
from porter.rewrites.imports import FixImports
from tests.porter.rewrite_helpers import (
    MINI_MODEL,
    REWRITE_NAMES,
    assert_code,
    import_block,
    make_context,
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
        "from engine.weights import load_declared_weights",
    ]


def test_module_docstring_stays_first():
    after = run_rewrites('"""The mini model."""\n\n' + MINI_MODEL, "tensor-parallel", "imports")
    assert after.code.startswith('"""The mini model."""\n')


# transformers 4.36.2, models/opt/modeling_opt.py (lines 15-37), as a user copies it out of the wheel.
OPT_4_36_IMPORTS = """\
from ...activations import ACT2FN
from ...modeling_attn_mask_utils import _prepare_4d_causal_attention_mask
from ...modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from ...modeling_utils import PreTrainedModel
from ...utils import is_flash_attn_2_available, logging
from .configuration_opt import OPTConfig
"""


def _copied_out_of_transformers(imports: str, reads: str) -> str:
    """The mini model with `imports` in place of its own and a module-level line reading `reads`."""
    return vary(MINI_MODEL, SOURCE_IMPORTS, imports) + f"\n\nREAD = ({reads},)\n"


def test_a_copied_transformers_file_imports_what_the_installed_transformers_still_defines():
    before = _copied_out_of_transformers(OPT_4_36_IMPORTS, "ACT2FN, logging, OPTConfig")
    tree, context = make_context(before, module=None)
    # A copy of transformers/models/opt/modeling_opt.py: its name says which folder it came from.
    context.source = replace(context.source, path=Path("modeling_opt.py"), display_name="modeling_opt.py")
    after = FixImports().apply(tree, context)
    assert context.review == []
    assert_code(
        import_block(after.code),
        """
        import torch
        from torch import nn
        from transformers.activations import ACT2FN
        from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
        from transformers.modeling_utils import PreTrainedModel
        from transformers.models.opt.configuration_opt import OPTConfig
        from transformers.utils import logging
        """,
    )


def test_a_name_the_installed_transformers_no_longer_defines_is_a_review_item():
    # transformers 4.36.2, models/gpt2/modeling_gpt2.py line 31; gone from transformers 5.
    imports = "from ...activations import ACT2FN\nfrom ...pytorch_utils import Conv1D, find_pruneable_heads_and_indices\n"
    before = _copied_out_of_transformers(imports, "ACT2FN, Conv1D, find_pruneable_heads_and_indices")
    after = run_rewrites(before, "imports", module=None)
    assert after.review_messages() == [
        "imports @ module: `find_pruneable_heads_and_indices` from `transformers.pytorch_utils`, "
        "which the installed transformers does not define"
    ]
    block = import_block(after.code)
    assert "from transformers.pytorch_utils import Conv1D\n" in block
    assert "from transformers.activations import ACT2FN\n" in block


def test_relative_import_of_a_file_that_is_no_transformers_file_is_a_review_item():
    # Only a sibling import (`from .layers import X`), no import reaching above the folder: remote
    # code, whose neighbours are not beside it here.
    before = vary(MINI_MODEL, SOURCE_IMPORTS, "from .layers import ACT2FN\n")
    after = run_rewrites(before, "imports", module=None)
    assert after.review_messages() == [
        "imports @ module: relative import `from .layers import ACT2FN` in a file outside transformers"
    ]


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
    engine_names = set(engine.layers.__all__) | {"load_declared_weights"}
    assert read & engine_names <= imported, f"used but not imported: {(read & engine_names) - imported}"
    assert {"PagedAttention", "QKVParallelLinear", "ParallelLMHead", "load_declared_weights"} <= imported


def test_a_copy_of_an_installed_modeling_file_ports_to_what_the_installed_one_does(tmp_path):
    # The README's `porter port modeling_opt.py --out ...` on a file copied out of transformers.
    import shutil

    from porter.analysis.source import locate
    from porter.port import generate

    installed = locate("opt")
    copy = tmp_path / "modeling_opt.py"
    shutil.copyfile(installed.path, copy)
    copied_text, copied = generate(locate(str(copy)))
    installed_text, _ = generate(installed)
    assert copied.review == []
    # Only the header differs: it names the source.
    assert copied_text.split("\n", 3)[3] == installed_text.split("\n", 3)[3]
    assert "# source: modeling_opt.py\n" in copied_text
