"""Remote code (a Hub model directory whose config.json names its own classes): where porter finds the
modeling file, which of its directory's modules travel with the port, and the engine loading it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from porter.analysis.source import locate, sibling_imports
from porter.errors import PorterError
from porter.siblings import MARKER, check_sibling_package, copy_siblings, imported_siblings

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "remote_code"


def test_a_model_directory_is_ported_from_the_file_its_auto_map_names():
    source = locate(str(CORPUS / "internlm"))
    assert source.path == CORPUS / "internlm" / "modeling_internlm.py"
    assert (source.model_type, source.module, source.display_name) == (
        "internlm",
        None,
        "modeling_internlm.py",
    )
    assert source.siblings == ("configuration_internlm",) and source.remote_code


def test_a_modeling_file_of_a_model_directory_knows_its_siblings():
    assert locate(str(CORPUS / "qwen" / "modeling_qwen.py")).siblings == (
        "configuration_qwen",
        "qwen_generation_utils",
    )


def test_siblings_imported_by_bare_name_count():
    # `from configuration_phi import PhiConfig`: works where the directory is on sys.path.
    assert sibling_imports(
        CORPUS / "phi2" / "modeling_phi.py", (CORPUS / "phi2" / "modeling_phi.py").read_text()
    ) == ("configuration_phi",)


def test_a_file_of_no_model_directory_is_no_remote_code(tmp_path):
    path = tmp_path / "modeling_x.py"
    path.write_text("from torch import nn\nfrom .missing import Y\n")
    assert not locate(str(path)).remote_code


def test_a_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(PorterError, match="without config.json"):
        locate(str(tmp_path))


def test_a_directory_whose_auto_map_names_no_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(PorterError, match="names no AutoModelForCausalLM"):
        locate(str(tmp_path))


def test_a_directory_whose_auto_map_names_a_missing_file_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.XLM"}})
    )
    with pytest.raises(PorterError, match="modeling_x.py in auto_map"):
        locate(str(tmp_path))


def test_the_siblings_a_port_imports_travel_with_those_they_import(tmp_path):
    source = replace(locate(str(CORPUS / "mpt")), support_package="mpt_port_code")
    out = tmp_path / "mpt_port.py"
    text = "from torch import nn\nfrom .mpt_port_code.blocks import MPTBlock\n"
    # attention.py imports flash_attn_triton inside a function: it travels too.
    assert imported_siblings(source, text) == [
        "blocks",
        "attention",
        "ffn",
        "norm",
        "fc",
        "flash_attn_triton",
    ]
    copies = copy_siblings(source, text, out)
    package = tmp_path / "mpt_port_code"
    assert sorted(p.name for p in copies) == sorted(f"{n}.py" for n in imported_siblings(source, text))
    assert (package / "__init__.py").read_text() == MARKER
    assert (package / "blocks.py").read_text() == (CORPUS / "mpt" / "blocks.py").read_text()


def test_a_port_that_imports_no_sibling_writes_no_package(tmp_path):
    source = locate(str(CORPUS / "internlm"))
    assert copy_siblings(source, "import torch\n", tmp_path / "port.py") == []
    assert list(tmp_path.iterdir()) == []


def test_a_folder_porter_did_not_make_is_not_written_into(tmp_path):
    source = locate(str(CORPUS / "internlm"))
    (tmp_path / source.sibling_package).mkdir()
    (tmp_path / source.sibling_package / "__init__.py").write_text("# mine\n")
    with pytest.raises(PorterError, match="not made by porter"):
        check_sibling_package(source, tmp_path / "port.py", force=False)
    check_sibling_package(source, tmp_path / "port.py", force=True)


def test_the_engine_loads_a_port_file_whose_relative_import_sits_beside_it(tmp_path):
    from engine.models.registry import load_target

    (tmp_path / "port_code").mkdir()
    (tmp_path / "port_code" / "__init__.py").write_text("")
    (tmp_path / "port_code" / "helpers.py").write_text("WIDTH = 7\n")
    (tmp_path / "port.py").write_text(
        "from torch import nn\nfrom .port_code.helpers import WIDTH\n\n\nclass M(nn.Module):\n    width = WIDTH\n"
    )
    assert load_target(f"{tmp_path / 'port.py'}:M").width == 7


def test_the_engine_reads_remote_configuration_code_only_when_trusted(tmp_path):
    from engine.model_loader import load_hf_config

    for name in ("config.json", "configuration_internlm.py"):
        shutil.copy(CORPUS / "internlm" / name, tmp_path / name)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_hf_config(tmp_path)
    config = load_hf_config(tmp_path, trust_remote_code=True)
    assert type(config).__name__ == "InternLMConfig" and config.hidden_size == 5120


@pytest.mark.slow
def test_a_remote_code_directory_ports_verifies_against_itself_and_serves(tmp_path, monkeypatch):
    """The whole path: port the directory, verify the port against the directory's own code (that
    side run by another interpreter, this one started anew, through files), then serve the checkpoint
    directory with the registered port."""
    import sys

    import torch

    from porter.port import port
    from porter.verify.parity import verify_model

    model_dir = tmp_path / "ember"
    model_dir.mkdir()
    shutil.copy(CORPUS.parent / "modeling_remote_code_style.py", model_dir / "modeling_ember.py")
    auto_map = {
        "AutoConfig": "modeling_ember.EmberConfig",
        "AutoModelForCausalLM": "modeling_ember.EmberForCausalLM",
    }
    (model_dir / "config.json").write_text(json.dumps({"model_type": "ember", "auto_map": auto_map}))
    outcome = port(str(model_dir), tmp_path / "ember_port.py", register_model=False)
    assert outcome.architecture == "EmberForCausalLM" and not outcome.result.review
    work = tmp_path / "work"
    work.mkdir()
    report = verify_model(
        str(model_dir),
        "EmberForCausalLM",
        f"{outcome.path}:EmberForCausalLM",
        work,
        1,
        "cpu",
        torch.float32,
        2,
        reference_python=sys.executable,
    )
    assert report.max_rel < 1e-4 and report.all_tokens_agree
    saved = json.loads((work / "config.json").read_text())
    assert saved["auto_map"] == auto_map and saved["hidden_size"] == 64  # the shrunk remote config

    # The registered port serves the model directory through LLM(trust_remote_code=True).
    from engine.llm import LLM, SamplingParams
    from engine.models import registry

    monkeypatch.setitem(registry._CUSTOM, "EmberForCausalLM", f"{outcome.path}:EmberForCausalLM")
    with LLM(str(work), device="cpu", trust_remote_code=True) as llm:
        [output] = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(output.outputs[0].token_ids) == 3


@pytest.mark.parametrize("spelled", ["from .layers import ACT2FN", "from layers import ACT2FN"])
def test_a_sibling_import_names_the_package_beside_the_port(spelled):
    from porter.rewrites.imports import FixImports
    from tests.porter.rewrite_helpers import MINI_MODEL, import_block, make_context, vary
    from tests.porter.test_imports import SOURCE_IMPORTS

    tree, context = make_context(vary(MINI_MODEL, SOURCE_IMPORTS, spelled + "\n"), module=None)
    context.source = replace(context.source, siblings=("layers",), support_package="mini_port_code")
    after = FixImports().apply(tree, context)
    assert "from .mini_port_code.layers import ACT2FN\n" in import_block(after.code)
    assert not context.review


def test_a_sibling_import_with_a_bare_fallback_is_one_import_of_the_package_beside_the_port():
    # openPangu's: `try: from .configuration_x import C except ImportError: from configuration_x import C`.
    from porter.rewrites.imports import FixImports
    from tests.porter.rewrite_helpers import MINI_MODEL, import_block, make_context, vary
    from tests.porter.test_imports import SOURCE_IMPORTS

    fallback = "try:\n    from .layers import ACT2FN\nexcept ImportError:\n    from layers import ACT2FN\n"
    tree, context = make_context(vary(MINI_MODEL, SOURCE_IMPORTS, fallback), module=None)
    context.source = replace(context.source, siblings=("layers",), support_package="mini_port_code")
    after = FixImports().apply(tree, context)
    assert "from .mini_port_code.layers import ACT2FN\n" in import_block(after.code)
    assert "try:" not in after.code and "from layers import" not in after.code
    assert not context.review


def test_a_try_importing_different_names_is_left_as_it_is():
    from porter.rewrites.imports import FixImports
    from tests.porter.rewrite_helpers import MINI_MODEL, make_context, vary
    from tests.porter.test_imports import SOURCE_IMPORTS

    fallback = (
        "try:\n    from .layers import ACT2FN\nexcept ImportError:\n    from layers import OTHER as ACT2FN\n"
    )
    tree, context = make_context(vary(MINI_MODEL, SOURCE_IMPORTS, fallback), module=None)
    context.source = replace(context.source, siblings=("layers",), support_package="mini_port_code")
    after = FixImports().apply(tree, context)
    assert "try:" in after.code
