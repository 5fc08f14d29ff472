"""`porter review` as data: JSON against its documented schema, SARIF 2.1.0 against the official
schema, spans that point at the code they name, and a checked-in port reviewed through its header.

One real port with review items (mamba under --allow-review: its state-space layer is a review
item) is built once for the module; the command-line tests reuse it instead of porting again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from porter.analysis.source import locate
from porter.cli import app
from porter.errors import PorterError
from porter.review import command, json_report, model, sarif
from porter.review.model import Review, review_port, review_source
from porter.review.rules import known_rules

SARIF_SCHEMA = Path(__file__).resolve().parents[1] / "fixtures" / "sarif-2.1.0" / "sarif-schema-2.1.0.json"


@pytest.fixture(scope="module")
def review() -> Review:
    return review_source(locate("mamba"))


@pytest.fixture
def reviewed_without_porting(monkeypatch, review):
    """`porter review ...` answered from the module's review."""
    monkeypatch.setattr(command, "load_review", lambda target, source: review)


def _squeezed(code: str) -> str:
    return "".join(code.replace("'", '"').split())


def test_json_follows_its_schema(review):
    data = json_report.review_json(review)
    schema = json.loads(json_report.SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(data)]
    assert errors == []
    assert len(data["changes"]) == len(review.changes) > 20
    assert [item["where"] for item in data["review_items"]] == [item.where for item in review.items]
    assert set(data["versions"]) == {"porter", "transformers"}
    assert {change["rule"] for change in data["changes"]} <= set(known_rules())


def test_spans_hold_the_code_they_name(review):
    """A change's source span holds the first line of its `before`, its port span the first line of
    its `after` (compared without whitespace and quote style, which the formatter changes)."""
    source, port = review.source_text.splitlines(), review.port_text.splitlines()
    placed_before = placed_after = with_before = with_after = 0
    for change in review.changes:
        if change.before and change.source and not change.source.empty:
            with_before += 1
            held = _squeezed("".join(source[line - 1] for line in change.source.lines()))
            placed_before += _squeezed(change.before.splitlines()[0]) in held
        if change.after and change.port and not change.port.empty:
            with_after += 1
            held = _squeezed("".join(port[line - 1] for line in change.port.lines()))
            placed_after += _squeezed(change.after.splitlines()[0]).rstrip(",") in held
    assert with_before > 20 and with_after > 10
    assert placed_before >= 0.9 * with_before, (placed_before, with_before)
    assert placed_after >= 0.85 * with_after, (placed_after, with_after)


def test_review_items_point_at_their_notes_in_the_port(review):
    port = review.port_text.splitlines()
    assert review.items
    for item in review.items:
        assert port[item.port.start - 1].startswith(f"# REVIEW {item.where}:")
        assert item.source is not None
        lines = review.source_text.splitlines()[item.source.start - 1 : item.source.end]
        assert any(line.strip().startswith(f"def {item.method}(") for line in lines)


def test_sarif_follows_the_official_schema(review):
    log = sarif.review_sarif(review)
    schema = json.loads(SARIF_SCHEMA.read_text())
    errors = [error.message for error in jsonschema.Draft4Validator(schema).iter_errors(log)]
    assert errors == []
    run = log["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [rule["id"] for rule in rules][: len(known_rules())] == list(known_rules())
    assert all(rule["help"]["text"] for rule in rules)
    levels = [result["level"] for result in run["results"]]
    assert levels.count("warning") == len(review.items)
    assert levels.count("note") == len(review.changes)
    for result in run["results"]:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        port_place, source_place = (location["physicalLocation"] for location in result["locations"])
        assert port_place["artifactLocation"]["uri"] == review.port_name
        assert source_place["artifactLocation"] == {
            "uri": "transformers/models/mamba/modeling_mamba.py",
            "uriBaseId": "TRANSFORMERS",
        }
        assert 1 <= port_place["region"]["startLine"] <= len(review.port_text.splitlines())


def test_command_writes_sarif_and_json(reviewed_without_porting, review, tmp_path):
    out = tmp_path / "review.sarif"
    result = CliRunner().invoke(app, ["review", "mamba", "--format", "sarif", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["runs"][0]["results"]) == len(review.changes) + len(review.items)
    result = CliRunner().invoke(app, ["review", "mamba", "--format", "json", "--rule", "hf-plumbing"])
    assert result.exit_code == 0, result.output
    rules = {change["rule"] for change in json.loads(result.stdout)["changes"]}
    assert rules == {"hf-plumbing"}


def test_side_by_side_shows_both_files_lines(reviewed_without_porting, review):
    result = CliRunner().invoke(app, ["review", "mamba", "--side-by-side", "--where", "MambaModel.__init__"])
    assert result.exit_code == 0, result.output
    change = next(
        c for c in review.changes if c.where == "MambaModel.__init__" and c.port and not c.port.empty
    )
    assert f"source L{change.source.start}" in result.output
    assert f"port L{change.port.start}" in result.output
    assert "changes shown of" in result.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--rule", "nosuchrule"], "unknown rule 'nosuchrule'; known rules: module-factories,"),
        (["--format", "yaml"], "unknown format 'yaml'"),
        (["--output", "review.json"], "--output writes --format json or sarif"),
    ],
)
def test_bad_options_are_one_line(arguments, message):
    result = CliRunner().invoke(app, ["review", "opt", *arguments])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_checked_in_port_is_reviewed_against_the_source_its_header_names(monkeypatch, review, tmp_path):
    asked = []

    def fresh_port(source, port_name=None):
        asked.append(source.display_name)
        return dataclasses.replace(review, port_name=port_name)

    monkeypatch.setattr(model, "review_source", fresh_port)
    port = tmp_path / "mamba.py"
    port.write_text(review.port_text)
    assert review_port(port).stale is None
    assert asked == ["transformers.models.mamba.modeling_mamba"]

    lines = review.port_text.splitlines(keepends=True)
    versions = next(i for i, line in enumerate(lines) if line.startswith("# transformers "))
    port.write_text(
        "".join(lines[:versions] + ["# transformers 4.40.0, porter 0.0.1\n"] + lines[versions + 1 :])
    )
    assert "names other versions (transformers 4.40.0, porter 0.0.1)" in review_port(port).stale

    port.write_text(review.port_text.replace("nn.Module", "torch.nn.Module", 1))
    stale = review_port(port).stale
    assert "is stale" in stale and "lines differing: 1)" in stale


@pytest.mark.parametrize(
    "source", ["modeling_x.py", "transformers.models.no_such_model.modeling_no_such_model"]
)
def test_port_of_a_source_porter_cannot_find_needs_source_option(source, tmp_path):
    port = tmp_path / "x.py"
    port.write_text(
        f"# generated by porter; do not edit, re-run porter port\n# source: {source}\n# transformers 5.0\n"
    )
    with pytest.raises(PorterError, match="not a module of the installed transformers; pass --source"):
        review_port(port)
    result = CliRunner().invoke(app, ["review", str(port)])
    assert result.exit_code == 1 and "pass --source" in result.output
