"""The reference side of `porter verify` for remote code: its config shrunk by the size names remote
code uses, and the files that carry the reference to the engine side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PretrainedConfig

from porter.errors import PorterError
from porter.verify.reference import INPUTS_FILE, LOGITS_FILE, read_reference, remote_config
from porter.verify.small_model import (
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    POSITIONS,
    VOCAB,
    literal_head_size,
    shrink_remote,
)

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "remote_code"


def test_a_remote_config_is_shrunk_by_the_size_names_remote_code_uses():
    config = PretrainedConfig(
        hidden_size=4096,
        n_head=32,
        multi_query_group_num=2,
        num_layers=28,
        seq_length=32768,
        kv_channels=128,
        padded_vocab_size=65024,
        vocab_size=65024,
        ffn_hidden_size=13696,
    )
    small = shrink_remote(config, "XForCausalLM")
    assert (small.hidden_size, small.n_head, small.multi_query_group_num, small.num_layers) == (
        HIDDEN,
        HEADS,
        KV_HEADS,
        LAYERS,
    )
    assert (small.seq_length, small.kv_channels, small.padded_vocab_size) == (
        POSITIONS,
        HIDDEN // HEADS,
        VOCAB,
    )
    assert small.architectures == ["XForCausalLM"]


def test_a_head_size_the_modeling_file_hard_codes_is_kept_by_the_small_config():
    # falcon_rw's `_split_heads`: `fused_qkv.view(batch, seq_len, -1, self.num_heads // self.num_kv + 2, 64)`
    modeling = (CORPUS / "falcon_rw" / "modelling_RW.py").read_text()
    assert literal_head_size(modeling) == 64
    config = PretrainedConfig(hidden_size=8192, n_head=128, n_head_kv=8, kv_channels=64)
    small = shrink_remote(config, "X", modeling)
    assert (small.hidden_size, small.n_head, small.kv_channels) == (HEADS * 64, HEADS, 64)
    # without the modeling file the head is HIDDEN // HEADS, which that view cannot take
    assert shrink_remote(PretrainedConfig(hidden_size=8192, n_head=128), "X").hidden_size == HIDDEN


def test_rotation_pairs_and_sources_without_a_literal_head_size_name_none():
    assert literal_head_size("x = q.view(b, s, h, -1, 2)\ny = k.view(b, s, h, self.head_dim)\n") is None
    assert literal_head_size((CORPUS / "internlm" / "modeling_internlm.py").read_text()) is None


def test_key_value_heads_equal_to_the_heads_stay_equal():
    small = shrink_remote(PretrainedConfig(hidden_size=1024, n_head=16, n_head_kv=16), "X")
    assert small.n_head_kv == small.n_head == HEADS


def test_a_directory_reference_reads_config_json_over_its_class_defaults(tmp_path):
    config, model_class = remote_config(CORPUS / "internlm", "InternLMForCausalLM", tmp_path)
    assert type(config).__name__ == "InternLMConfig" and model_class.__name__ == "InternLMForCausalLM"
    assert config.hidden_size == HIDDEN and config.num_hidden_layers == LAYERS
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm.InternLMForCausalLM"
    assert (tmp_path / "configuration_internlm.py").is_file()


def test_a_modeling_file_reference_finds_the_configuration_it_imports(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("modeling_internlm.py", "configuration_internlm.py"):
        (source / name).write_text((CORPUS / "internlm" / name).read_text())
    work = tmp_path / "work"
    work.mkdir()
    config, _ = remote_config(source / "modeling_internlm.py", "InternLMForCausalLM", work)
    auto_map = json.loads((work / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_internlm.InternLMConfig"
    assert type(config).__name__ == "InternLMConfig"


def test_a_modeling_file_without_a_configuration_module_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "modeling_x.py").write_text("import torch\n")
    (tmp_path / "work").mkdir()
    with pytest.raises(PorterError, match="imports no configuration module"):
        remote_config(tmp_path / "src" / "modeling_x.py", "XForCausalLM", tmp_path / "work")


def test_the_reference_logits_and_inputs_read_back_per_step_and_sequence(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "reference").mkdir()
    logits = {"0.0": torch.randn(7), "0.1": torch.randn(7), "1.1": torch.randn(7)}
    save_file(logits, str(tmp_path / LOGITS_FILE))
    (tmp_path / INPUTS_FILE).write_text(
        json.dumps({"inputs": [[[0, [1, 2]], [1, [3]]], [[1, [4]]]], "trust_remote_code": True})
    )
    run = read_reference(tmp_path)
    assert run.inputs_per_step == [{0: [1, 2], 1: [3]}, {1: [4]}] and run.trust_remote_code
    assert torch.equal(run.logits_per_step[1][1], logits["1.1"]) and list(run.logits_per_step[0]) == [0, 1]


def test_per_frequency_lists_of_a_remote_rope_follow_the_small_head():
    # A long-context rope lists one factor per frequency of the default head (3072 / 32 / 2 = 48).
    config = PretrainedConfig(
        hidden_size=3072, num_attention_heads=32, scaling={"short_factor": [1.0] * 48, "other": [1.0] * 5}
    )
    small = shrink_remote(config, "X")
    assert len(small.scaling["short_factor"]) == HIDDEN // HEADS // 2 and len(small.scaling["other"]) == 5


_LOAD_BAICHUAN = """
import sys
from pathlib import Path
from porter.verify.reference import remote_config
_, model_class = remote_config(Path(sys.argv[1]), "BaiChuanForCausalLM", Path(sys.argv[2]))
xops = sys.modules[model_class.__module__].xops
try:
    xops.memory_efficient_attention(None, None, None)
except ImportError as error:
    print(error)
"""


def test_remote_code_importing_a_missing_package_loads_and_fails_only_where_the_run_reaches_it(tmp_path):
    # Baichuan-7B's `from xformers import ops as xops` sits at module level; only its training branch calls it.
    import subprocess
    import sys

    from porter.verify.missing_imports import missing_packages

    assert missing_packages(CORPUS / "baichuan_7b") == ["xformers"]
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_BAICHUAN, str(CORPUS / "baichuan_7b"), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "the reference run reached xformers.ops.memory_efficient_attention, and xformers is not installed"
    )


def test_a_package_imported_inside_try_is_not_replaced(tmp_path):
    from porter.verify.missing_imports import missing_packages

    (tmp_path / "modeling_x.py").write_text(
        "try:\n    import not_installed_fast_kernels\nexcept ImportError:\n    pass\n"
        "import not_installed_training_kernels\nimport torch\nfrom .configuration_x import XConfig\n"
    )
    (tmp_path / "configuration_x.py").write_text("XConfig = None\n")
    assert missing_packages(tmp_path) == ["not_installed_training_kernels"]


def test_a_head_tied_without_declared_keys_is_declared_for_a_4x_save(monkeypatch):
    # falcon_rw's RWForCausalLM: no `_tied_weights_keys`, lm_head tied to the word embeddings, which
    # transformers 4.40's save_pretrained refuses as undeclared shared tensors.
    from porter.verify import small_model

    class Tied(torch.nn.Module):
        _tied_weights_keys = None

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.lm_head = torch.nn.Linear(3, 5, bias=False)
            self.lm_head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.lm_head

    monkeypatch.setattr(small_model.transformers, "__version__", "4.40.2")
    model = Tied()
    small_model._declare_tied_head(model)
    assert model._tied_weights_keys == ["lm_head.weight"]
    untied = Tied()
    untied.lm_head.weight = torch.nn.Parameter(torch.zeros(5, 3))
    small_model._declare_tied_head(untied)
    assert untied._tied_weights_keys is None
