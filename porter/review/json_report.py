"""`porter review --format json`: the review as data, in the shape review.schema.json documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from porter.review.model import Review, ReviewedChange, ReviewedItem
from porter.review.spans import Span

FORMAT = "porter-review"
FORMAT_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("review.schema.json")


def review_json(review: Review) -> dict[str, Any]:
    """The review as a JSON-ready dict (see review.schema.json for every field)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": dict(review.versions),
        "source": {"name": review.source_name, "path": _shown_path(review.source_path)},
        "port": {"path": review.port_name},
        "stale": review.stale,
        "changes": [_change(index, change) for index, change in enumerate(review.changes)],
        "review_items": [_item(item) for item in review.items],
    }


def dumps(review: Review) -> str:
    return json.dumps(review_json(review), indent=2) + "\n"


def _change(index: int, change: ReviewedChange) -> dict[str, Any]:
    return {
        "index": index,
        "rule": change.rule,
        "class": change.class_name,
        "method": change.method,
        "where": change.where,
        "source_span": _span(change.source),
        "port_span": _span(change.port),
        "before": change.before,
        "after": change.after,
        "why": change.why,
    }


def _item(item: ReviewedItem) -> dict[str, Any]:
    return {
        "rule": item.rule,
        "class": item.class_name,
        "method": item.method,
        "where": item.where,
        "message": item.message,
        "source_span": _span(item.source),
        "port_span": _span(item.port),
    }


def _span(span: Span | None) -> dict[str, int] | None:
    return None if span is None else {"start_line": span.start, "end_line": span.end}


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
