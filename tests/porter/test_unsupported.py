"""Constructs the engine cannot run stop the port with one line naming the construct and its line;
--allow-review writes the file anyway with each place marked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from porter.analysis.source import locate
from porter.cli import app


@pytest.mark.parametrize(
    ("model_type", "construct"),
    [
        ("mamba", "a recurrent or state-space layer"),
    ],
)
def test_unsupported_construct_stops_the_port(model_type, construct, tmp_path):
    out = tmp_path / "port.py"
    result = CliRunner().invoke(app, ["port", model_type, "--out", str(out), "--no-register"])
    assert result.exit_code == 1
    assert construct in result.output
    assert "(line " in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_allow_review_writes_the_file_with_the_places_marked(tmp_path):
    out = tmp_path / "port.py"
    result = CliRunner().invoke(app, ["port", "mamba", "--out", str(out), "--no-register", "--allow-review"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "# REVIEW MambaMixer" in text
    assert "state-space" in text


def _variant_file(tmp_path, model_type: str, old: str, new: str) -> Path:
    """The installed modeling file of `model_type` with `old` replaced by `new`, its relative imports
    made absolute so it ports from outside transformers."""
    text = locate(model_type).text
    assert old in text
    text = text.replace(old, new)
    text = re.sub(r"^from \.\.\. import ", "from transformers import ", text, flags=re.MULTILINE)
    text = re.sub(r"^from \.\.\.", "from transformers.", text, flags=re.MULTILINE)
    text = re.sub(r"^from \.", f"from transformers.models.{model_type}.", text, flags=re.MULTILINE)
    path = tmp_path / f"modeling_{model_type}.py"
    path.write_text(text)
    return path


def test_latent_attention_it_cannot_decide_stops_the_port(tmp_path):
    # DeepSeek-V3's core called without its scale: MultiLatentAttention would need one porter does
    # not know, so the port stops naming it rather than guess head_dim ** -0.5.
    source = _variant_file(tmp_path, "deepseek_v3", "            scaling=self.scaling,\n", "")
    out = tmp_path / "port.py"
    result = CliRunner().invoke(app, ["port", str(source), "--out", str(out), "--no-register"])
    assert result.exit_code == 1
    assert "cannot decide the latent attention of DeepseekV3Attention: the softmax scale" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_an_input_the_port_stopped_reading_stops_the_port(tmp_path):
    # MPT's bias, built by a function whose name no longer says ALiBi: porter cannot tell it is one,
    # so once the core is a PagedAttention the bias would be passed and ignored, and the port would
    # run and be wrong.
    source = _variant_file(tmp_path, "mpt", "build_mpt_alibi_tensor", "build_mpt_position_bias")
    out = tmp_path / "mpt.py"
    result = CliRunner().invoke(app, ["port", str(source), "--out", str(out), "--no-register"])
    assert result.exit_code != 0
    assert "MptAttention.forward: `position_bias` is passed in but no longer read" in result.output
    assert not out.exists()


def test_unread_forward_inputs_ignores_the_engine_inputs():
    import libcst as cst

    from porter.pipeline import unread_forward_inputs

    module = cst.parse_module(
        "class A:\n"
        "    def forward(self, x, positions, kv_cache, input_metadata, bias):\n"
        "        return x\n"
        "class B:\n"
        "    def forward(self, x, bias):\n"
        "        return x + bias\n"
    )
    assert unread_forward_inputs(module) == [("A.forward", "bias")]


def test_rotary_applied_one_tensor_per_call_that_cannot_be_paired_stops_the_port(tmp_path):
    # CodeGen rotates q and k one call each like GPT-J; rotating v instead of q leaves a call porter
    # cannot pair with q and k: it must stop, not port the rotation half-done.
    source = _variant_file(
        tmp_path,
        "codegen",
        "            query = apply_rotary_pos_emb(query, sin, cos)",
        "            value = apply_rotary_pos_emb(value, sin, cos)",
    )
    out = tmp_path / "codegen.py"
    result = CliRunner().invoke(app, ["port", str(source), "--out", str(out), "--no-register"])
    assert result.exit_code != 0
    assert "`apply_rotary_pos_emb` rotates one tensor per call, and porter could not pair" in result.output
    assert not out.exists()
