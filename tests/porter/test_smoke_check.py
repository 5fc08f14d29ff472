"""A port is built and run on a small config before it is written (porter.verify.smoke): a port that
fails there is a review item naming its line, never a file written as if it were fine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import porter.port
from porter.analysis.source import locate
from porter.errors import PorterError
from porter.verify.smoke import place_of, smoke_check

OPT_PORT = Path(__file__).resolve().parents[2] / "engine" / "models" / "opt.py"
GOOD_LINE = "        attn_output = self.out_proj(attn_output)\n"
BAD_LINE = "        attn_output = self.out_proj(attn_output.view(2, -1))\n"


def _broken_opt() -> str:
    text = OPT_PORT.read_text()
    assert text.count(GOOD_LINE) == 1
    return text.replace(GOOD_LINE, BAD_LINE)


def test_a_port_that_runs_passes_the_check():
    assert smoke_check(OPT_PORT.read_text(), locate("opt"), "OPTForCausalLM") is None


def test_a_port_that_fails_names_the_line_and_the_method():
    broken = _broken_opt()
    failure = smoke_check(broken, locate("opt"), "OPTForCausalLM")
    assert failure is not None
    assert failure.message.startswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied")
    assert place_of(broken, failure.line) == ("OPTAttention.forward", BAD_LINE.strip())


def test_a_port_that_does_not_import_names_the_line():
    broken = OPT_PORT.read_text().replace(
        "import torch\n", "import torch\nfrom engine.layers import NoSuchLayer\n", 1
    )
    failure = smoke_check(broken, locate("opt"), "OPTForCausalLM")
    assert failure is not None and "NoSuchLayer" in failure.message
    assert place_of(broken, failure.line)[1] == "from engine.layers import NoSuchLayer"


def test_generate_stops_on_a_port_that_fails_and_marks_it_with_allow_review(monkeypatch):
    real = porter.port.port_source

    def broken_port(source, allow_review=False):
        result = real(source, allow_review)
        code = result.code.replace(GOOD_LINE, BAD_LINE)
        assert code != result.code
        return replace(result, code=code)

    monkeypatch.setattr(porter.port, "port_source", broken_port)
    with pytest.raises(
        PorterError, match=r"cannot port OPTAttention.forward: the port fails on a small config"
    ):
        porter.port.generate(locate("opt"))
    text, result = porter.port.generate(locate("opt"), allow_review=True)
    assert [item.rule for item in result.review] == ["check"]
    review_lines = [line for line in text.splitlines() if line.startswith("# REVIEW")]
    assert len(review_lines) == 1
    assert review_lines[0].startswith("# REVIEW OPTAttention.forward: the port fails on a small config at")
