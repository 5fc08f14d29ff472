"""Constructs the engine cannot run stop the port with one line naming the construct and its line;
--allow-review writes the file anyway with each place marked."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from porter.cli import app


@pytest.mark.parametrize(
    ("model_type", "construct"),
    [
        ("mixtral", "mixture-of-experts routing"),
        ("mamba", "a recurrent or state-space layer"),
        ("deepseek_v3", "mixture-of-experts routing"),
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
