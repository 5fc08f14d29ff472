"""`porter review`: load the review of a source or a checked-in port, filter it, write each view."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax

from porter.analysis.source import locate
from porter.emit import write_atomically
from porter.errors import PorterError
from porter.review import json_report, sarif
from porter.review.html import review_html
from porter.review.model import Review, is_port_file, review_port, review_source
from porter.review.rules import known_rules
from porter.review.terminal import render_review, selected_changes, unified_diff

FORMATS = ("terminal", "json", "sarif")


def run_review(
    console: Console,
    errors: Console,
    target: str,
    *,
    rule: str | None = None,
    where: str | None = None,
    diff: bool = False,
    side_by_side: bool = False,
    html_path: Path | None = None,
    output_format: str = "terminal",
    output: Path | None = None,
    source: str | None = None,
) -> None:
    """Reviews TARGET (a source, a model type, or a checked-in port) in the views asked for."""
    if output_format not in FORMATS:
        raise PorterError(f"unknown format '{output_format}'; use one of: {', '.join(FORMATS)}")
    if rule is not None and rule not in known_rules():
        raise PorterError(f"unknown rule '{rule}'; known rules: {', '.join(known_rules())}")
    if output is not None and output_format == "terminal":
        raise PorterError("--output writes --format json or sarif; the terminal view prints")
    review = load_review(target, source)
    total = len(review.changes)
    shown = selected_changes(review, rule, where)
    if rule or where:
        review = dataclasses.replace(review, changes=shown)
    if review.stale and output_format != "terminal":
        errors.print(f"[yellow]note:[/] {review.stale}", highlight=False, soft_wrap=True)
    if html_path is not None:
        write_atomically(html_path, review_html(review))
        note = f"wrote {html_path}: {len(review.changes)} changes, {len(review.items)} review items"
        (errors if output_format != "terminal" else console).print(note, highlight=False)
    if output_format != "terminal":
        text = json_report.dumps(review) if output_format == "json" else sarif.dumps(review)
        if output is None:
            sys.stdout.write(text)
        else:
            write_atomically(output, text)
        return
    if html_path is not None and not (rule or where or diff or side_by_side):
        return
    render_review(console, review, review.changes, side_by_side)
    if diff:
        console.print(
            Syntax(
                unified_diff(review.source_text, review.port_text, review.source_name, review.port_name),
                "diff",
                background_color="default",
            )
        )
    console.print(f"{len(shown)} changes shown of {total}; review items: {len(review.items)}")


def load_review(target: str, source: str | None) -> Review:
    if is_port_file(target):
        return review_port(Path(target), source)
    if source is not None:
        raise PorterError("--source names the source of a checked-in port; TARGET is not one")
    return review_source(locate(target))
