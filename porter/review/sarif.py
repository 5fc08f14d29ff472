"""`porter review --format sarif`: the review as a SARIF 2.1.0 log, for editors and code scanning.

One SARIF rule per porter rewrite (its docstring is the help text). Each review item is a `warning`,
each change a `note`; a result is located in the generated file first (the file a repository holds
and code scanning annotates) and in the source second, with the class and method as its logical
location.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers

import porter
from porter.review.model import Review
from porter.review.rules import known_rules
from porter.review.spans import Span, lines_of

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
# Base ids for relative artifact locations: the working directory (where the port lives) and the
# folder holding the installed transformers package (where its modeling files live).
SOURCE_ROOT = "SRCROOT"
TRANSFORMERS_ROOT = "TRANSFORMERS"


def review_sarif(review: Review) -> dict[str, Any]:
    rules = known_rules()
    order = list(rules)
    for name in [*(c.rule for c in review.changes), *(i.rule for i in review.items)]:
        if name not in rules:  # a check that names a rule of its own; listed so every result resolves
            order.append(name)
    port_location = {"uri": Path(review.port_name).as_posix(), "uriBaseId": SOURCE_ROOT}
    source_location = _artifact(review.source_path)
    lines = {"port": lines_of(review.port_text), "source": lines_of(review.source_text)}
    results = []
    for item in review.items:
        results.append(
            _result(
                item.rule,
                order,
                "warning",
                f"{item.where}: {item.message}",
                item.where,
                [
                    (port_location, item.port, "port", lines["port"]),
                    (source_location, item.source, "source", lines["source"]),
                ],
            )
        )
    for change in review.changes:
        results.append(
            _result(
                change.rule,
                order,
                "note",
                _change_message(change.why, change.before, change.after),
                change.where,
                [
                    (port_location, change.port, "port", lines["port"]),
                    (source_location, change.source, "source", lines["source"]),
                ],
            )
        )
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "porter",
                "version": porter.__version__,
                "semanticVersion": porter.__version__,
                "rules": [_rule(name, rules.get(name)) for name in order],
            }
        },
        "originalUriBaseIds": {
            SOURCE_ROOT: {"uri": Path.cwd().resolve().as_uri() + "/"},
            TRANSFORMERS_ROOT: {"uri": _transformers_root().as_uri() + "/"},
        },
        "artifacts": [
            {
                "location": port_location,
                "roles": ["resultFile"],
                "description": {"text": "the generated port"},
            },
            {
                "location": source_location,
                "roles": ["analysisTarget"],
                "description": {"text": f"the source: {review.source_name}"},
            },
        ],
        "results": results,
        "properties": {"transformers": transformers.__version__, "stale": review.stale},
    }
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}


def dumps(review: Review) -> str:
    return json.dumps(review_sarif(review), indent=2) + "\n"


def _rule(name: str, rule) -> dict[str, Any]:
    summary = rule.summary if rule else f"{name} check"
    text = rule.help if rule else summary
    return {
        "id": name,
        "shortDescription": {"text": summary},
        "fullDescription": {"text": text},
        "help": {"text": text, "markdown": text},
        "defaultConfiguration": {"level": "warning" if name == "unsupported" else "note"},
    }


def _result(
    rule: str,
    order: list[str],
    level: str,
    message: str,
    where: str,
    places: list[tuple[dict[str, str], Span | None, str, list[str]]],
) -> dict[str, Any]:
    locations = []
    for artifact, span, side, lines in places:
        if span is None:
            continue
        locations.append(
            {
                "physicalLocation": {"artifactLocation": dict(artifact), "region": _region(span, lines)},
                "message": {"text": f"in the {side}"},
                "logicalLocations": [
                    {"fullyQualifiedName": where, "kind": "function" if "." in where else "type"}
                ],
            }
        )
    return {
        "ruleId": rule,
        "ruleIndex": order.index(rule),
        "level": level,
        "message": {"text": message},
        "locations": locations,
    }


def _region(span: Span, lines: list[str]) -> dict[str, int]:
    last_line = max(len(lines), 1)
    if span.empty:  # an insertion point: removed code stood here (port) or added code goes here (source)
        line = min(max(span.start, 1), last_line)
        return {"startLine": line, "startColumn": 1, "endLine": line, "endColumn": 1}
    end = min(span.end, last_line)
    return {
        "startLine": min(span.start, end),
        "endLine": end,
        "endColumn": len(lines[end - 1]) + 1 if lines else 1,
    }


def _change_message(why: str, before: str, after: str) -> str:
    def first_line(code: str) -> str:
        lines = code.strip().splitlines()
        return lines[0] + (" ..." if len(lines) > 1 else "") if lines else ""

    if before and after:
        return f"{why}: `{first_line(before)}` -> `{first_line(after)}`"
    if before:
        return f"{why}: removed `{first_line(before)}`"
    return f"{why}: added `{first_line(after)}`"


def _artifact(path: Path) -> dict[str, str]:
    resolved = path.resolve()
    # The installed transformers first: a virtual environment inside the working directory holds it.
    for base, root in ((TRANSFORMERS_ROOT, _transformers_root()), (SOURCE_ROOT, Path.cwd().resolve())):
        try:
            return {"uri": resolved.relative_to(root).as_posix(), "uriBaseId": base}
        except ValueError:
            continue
    return {"uri": resolved.as_uri()}


def _transformers_root() -> Path:
    return Path(transformers.__file__).resolve().parent.parent
