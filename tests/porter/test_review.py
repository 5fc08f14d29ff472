"""`porter review` explains a port's changes: rule, place, before, after and the reason."""

from __future__ import annotations

from typer.testing import CliRunner

from porter.cli import app


def test_review_shows_each_change_with_its_reason():
    result = CliRunner().invoke(app, ["review", "opt", "--rule", "fuse-qkv"])
    assert result.exit_code == 0, result.output
    assert "OPTAttention" in result.output
    assert "QKVParallelLinear" in result.output
    assert "q, k and v fused, column-parallel by head" in result.output
    assert "[tensor-parallel]" not in result.output  # the filter holds


def test_review_diff_and_counts():
    result = CliRunner().invoke(app, ["review", "opt", "--diff", "--where", "OPTDecoderLayer"])
    assert result.exit_code == 0, result.output
    assert "+        self.fc1 = ColumnParallelLinear" in result.output
    assert "changes shown of" in result.output


def test_review_of_a_missing_file_is_one_line():
    result = CliRunner().invoke(app, ["review", "no/such/modeling_x.py"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
