"""`porter review --html FILE`: one self-contained page, source and port side by side.

Rows pair each source line with the port line it became (the lines every rewrite kept, in order);
the lines between are set side by side like a diff's hunks. Every change highlights its lines on
both sides and has a margin note (rule, reason, before and after) linking to both line numbers; a
sidebar lists the changes by rule and by class with counts and filters them; `n`/`p` step through
them. Highlighting is done here with pygments; the page loads nothing (its content security policy
forbids it), so it opens the same offline, attached to a pull request, or years later.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer
from pygments.token import STANDARD_TYPES, _TokenType

from porter.review.model import REVIEW_NOTE, Review, ReviewedChange, ReviewedItem
from porter.review.spans import Span, lines_of

ASSETS = Path(__file__).with_name("assets")
PYGMENTS_STYLE = "default"
# Lines of `before` / `after` a margin note shows; the rest is one click away.
NOTE_CODE_LINES = 10
CONTENT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def review_html(review: Review) -> str:
    """The whole page as one string."""
    source_lines = highlight(review.source_text)
    port_lines = highlight(review.port_text)
    rows = aligned_rows(review.aligned, len(source_lines), len(port_lines))
    source_marks = _marks(review, "source")
    port_marks = _marks(review, "port")
    _mark_unexplained_edits(review, source_marks, port_marks)
    for index, line in enumerate(lines_of(review.port_text)):
        if line.startswith(REVIEW_NOTE):
            port_marks[index + 1].add("rev")
    row_of_source = {s: r for r, (s, _) in enumerate(rows) if s is not None}
    row_of_port = {p: r for r, (_, p) in enumerate(rows) if p is not None}

    grid = []
    for row, (source_index, port_index) in enumerate(rows):
        grid.append(_cell("s", source_index, source_lines, source_marks, row))
        grid.append(_cell("p", port_index, port_lines, port_marks, row))

    def anchor_row(source: Span | None, port: Span | None) -> int:
        """The row a note sits on: where its lines start; a side where code only went or came
        (an empty span) counts only if neither side has lines."""
        places = [
            (span.empty, rows_of.get(min(span.start, count) - 1, 0))
            for span, rows_of, count in (
                (source, row_of_source, len(source_lines)),
                (port, row_of_port, len(port_lines)),
            )
            if span is not None
        ]
        return min(places)[1] if places else 0

    counts = (len(source_lines), len(port_lines))
    notes = [
        (anchor_row(item.source, item.port), 0, _item_note(index, item, counts))
        for index, item in enumerate(review.items)
    ]
    notes += [
        (anchor_row(change.source, change.port), 1, _change_note(index, change, counts))
        for index, change in enumerate(review.changes)
    ]
    notes.sort(key=lambda note: (note[0], note[1]))
    margin = "".join(f'<div class="note-slot" data-row="{row}">{note}</div>' for row, _, note in notes)

    title = f"porter review: {review.source_name}"
    css = (ASSETS / "review.css").read_text()
    script = (ASSETS / "review.js").read_text()
    highlight_css = HtmlFormatter(style=PYGMENTS_STYLE).get_token_style_defs(".hl")
    stale = f'<p class="stale">{html.escape(review.stale)}</p>' if review.stale else ""
    versions = ", ".join(f"{name} {version}" for name, version in review.versions.items())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CONTENT_POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)}</title>
<style>
{css}
{highlight_css}
</style>
</head>
<body>
<nav id="sidebar">
<h1>porter review</h1>
<p class="meta">{html.escape(review.source_name)} &rarr; {html.escape(review.port_name)}<br>{html.escape(versions)}</p>
{stale}
<p class="counts"><b id="shown-count">{len(review.changes)}</b> of {len(review.changes)} changes shown,
<b>{len(review.items)}</b> review items</p>
<div class="filters">
<label>rule {_select("rule-filter", review.rule_counts())}</label>
<label>class {_select("class-filter", review.class_counts())}</label>
</div>
<p class="keys"><kbd>n</kbd> next change, <kbd>p</kbd> previous</p>
<p class="legend"><span class="swatch chg-source"></span>source of a change <span class="swatch chg-port"></span>its
port <span class="swatch rev"></span>review item <span class="swatch edit"></span>edited, no rule recorded</p>
<div class="tabs"><button type="button" data-group="by-rule" class="active">by rule</button><button
 type="button" data-group="by-class">by class</button></div>
{_items_list(review.items)}
{_grouped("by-rule", review.changes, lambda change: change.rule, hidden=False)}
{_grouped("by-class", review.changes, lambda change: change.class_name or "module", hidden=True)}
</nav>
<main id="scroller">
<div id="heads"><div>source: {html.escape(review.source_name)}</div><div>port: {html.escape(review.port_name)}</div><div>why</div></div>
<div id="view">
<div id="grid" class="hl">{"".join(grid)}</div>
<div id="notes">{margin}</div>
</div>
</main>
<script>
{script}
</script>
</body>
</html>
"""


def highlight(text: str) -> list[str]:
    """`text` as HTML, one string per line, tokens in pygments' short CSS classes."""
    lexer = PythonLexer(stripnl=False, ensurenl=True, tabsize=4)
    lines: list[str] = [""]
    for token_type, value in lexer.get_tokens(text):
        css = _css_class(token_type)
        for position, part in enumerate(value.split("\n")):
            if position:
                lines.append("")
            if part:
                escaped = html.escape(part, quote=False)
                lines[-1] += f'<span class="{css}">{escaped}</span>' if css else escaped
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def aligned_rows(
    pairs: list[tuple[int, int]], source_count: int, port_count: int
) -> list[tuple[int | None, int | None]]:
    """Rows of (source line index, port line index): each pair on one row, the lines between two
    pairs side by side, the shorter side padded."""
    rows: list[tuple[int | None, int | None]] = []
    next_source = next_port = 0
    for source_index, port_index in [*pairs, (source_count, port_count)]:
        gap = max(source_index - next_source, port_index - next_port)
        for offset in range(gap):
            source = next_source + offset if next_source + offset < source_index else None
            port = next_port + offset if next_port + offset < port_index else None
            rows.append((source, port))
        if source_index < source_count:
            rows.append((source_index, port_index))
        next_source, next_port = source_index + 1, port_index + 1
    return rows


def _css_class(token_type: _TokenType) -> str:
    """Pygments' short class for a token type (`k`, `nf`, ...), from its nearest standard ancestor."""
    while token_type not in STANDARD_TYPES:
        token_type = token_type.parent
    return STANDARD_TYPES[token_type]


def _marks(review: Review, side: str) -> defaultdict[int, set[str]]:
    """line number -> the classes its cell gets: `chg` (with `c<index>` per change), `cut` (code was
    removed or added just above it), `rev` (a review item's place)."""
    marks: defaultdict[int, set[str]] = defaultdict(set)
    for index, change in enumerate(review.changes):
        span = change.source if side == "source" else change.port
        if span is None:
            continue
        if span.empty:
            marks[span.start] |= {"cut", f"c{index}"}
        for line in span.lines():
            marks[line] |= {"chg", f"c{index}"}
    for index, item in enumerate(review.items):
        span = item.source if side == "source" else item.port
        if span is not None:
            marks[span.start] |= {"rev", f"r{index}"}
    return marks


def _mark_unexplained_edits(review: Review, source_marks, port_marks) -> None:
    """Marks `edit` the lines the port changed (removed, added or rewritten) that no change's span
    covers: edits made without a record (an import rewritten, the formatter's line breaks) are shown,
    not hidden."""
    source_lines, port_lines = lines_of(review.source_text), lines_of(review.port_text)
    kept = [(s, p) for s, p in review.aligned if source_lines[s].strip() == port_lines[p].strip()]
    kept_source, kept_port = {s for s, _ in kept}, {p for _, p in kept}
    for marks, lines, kept_lines in (
        (source_marks, source_lines, kept_source),
        (port_marks, port_lines, kept_port),
    ):
        for index, line in enumerate(lines):
            if index not in kept_lines and line.strip() and not marks.get(index + 1, set()) & {"chg", "rev"}:
                marks[index + 1].add("edit")


def _cell(prefix: str, index: int | None, lines: list[str], marks: dict[int, set[str]], row: int) -> str:
    if index is None:
        return f'<div class="ln fill" data-row="{row}"></div>'
    number = index + 1
    classes = " ".join(["ln", *sorted(marks.get(number, ()))])
    return (
        f'<div class="{classes}" id="{prefix}{number}" data-row="{row}">'
        f'<span class="no">{number}</span><span class="code">{lines[index] if index < len(lines) else ""}</span></div>'
    )


def _place_link(prefix: str, side: str, span: Span | None, count: int) -> str:
    if span is None:
        return f'<span class="place">{side} ?</span>'
    line = min(max(span.start, 1), max(count, 1))
    text = f"{side} before L{span.start}" if span.empty else f"{side} L{span.start}"
    if not span.empty and span.end != span.start:
        text += f"-{span.end}"
    return f'<a class="place to-{side}" href="#{prefix}{line}" data-line="{prefix}{line}">{text}</a>'


def _code_block(code: str, kind: str) -> str:
    if not code:
        return ""
    lines = code.splitlines()
    shown = "\n".join(highlight("\n".join(lines[:NOTE_CODE_LINES])))
    more = (
        f'<span class="more">... {len(lines) - NOTE_CODE_LINES} more lines</span>'
        if len(lines) > NOTE_CODE_LINES
        else ""
    )
    return f'<pre class="{kind} hl"><span class="label">{kind}</span>{shown}{more}</pre>'


def _change_note(index: int, change: ReviewedChange, counts: tuple[int, int]) -> str:
    where = html.escape(change.where)
    return (
        f'<section class="hunk note" id="c{index}" data-index="{index}" data-rule="{html.escape(change.rule)}"'
        f' data-class="{html.escape(change.class_name or "module")}">'
        f'<header><span class="rule">{html.escape(change.rule)}</span> <span class="where">{where}</span></header>'
        f'<p class="why">{html.escape(change.why)}</p>'
        f'<p class="places">{_place_link("s", "source", change.source, counts[0])} '
        f"{_place_link('p', 'port', change.port, counts[1])}</p>"
        f'<div class="code-pair">{_code_block(change.before, "before")}{_code_block(change.after, "after")}</div>'
        "</section>"
    )


def _item_note(index: int, item: ReviewedItem, counts: tuple[int, int]) -> str:
    return (
        f'<section class="review-item note" id="r{index}" data-rule="{html.escape(item.rule)}"'
        f' data-class="{html.escape(item.class_name or "module")}">'
        f'<header><span class="rule">review: {html.escape(item.rule)}</span>'
        f' <span class="where">{html.escape(item.where)}</span></header>'
        f'<p class="why">{html.escape(item.message)}</p>'
        f'<p class="places">{_place_link("s", "source", item.source, counts[0])} '
        f"{_place_link('p', 'port', item.port, counts[1])}</p></section>"
    )


def _select(name: str, counts) -> str:
    options = [f'<option value="">all ({sum(counts.values())})</option>']
    options += [
        f'<option value="{html.escape(key)}">{html.escape(key)} ({count})</option>'
        for key, count in sorted(counts.items())
    ]
    return f'<select id="{name}">{"".join(options)}</select>'


def _items_list(items: list[ReviewedItem]) -> str:
    if not items:
        return ""
    entries = "".join(
        f'<li><a class="item-entry" href="#r{index}" data-note="r{index}">{html.escape(item.where)}: '
        f"{html.escape(item.message)}</a></li>"
        for index, item in enumerate(items)
    )
    return f'<details open class="group items"><summary>review items ({len(items)})</summary><ul>{entries}</ul></details>'


def _grouped(name: str, changes: list[ReviewedChange], key, hidden: bool) -> str:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, change in enumerate(changes):
        groups[key(change)].append(index)
    parts = []
    for group in sorted(groups):
        entries = "".join(
            f'<li><a class="entry" href="#c{index}" data-note="c{index}" data-index="{index}"'
            f' data-rule="{html.escape(changes[index].rule)}"'
            f' data-class="{html.escape(changes[index].class_name or "module")}">'
            f'<span class="where">{html.escape(changes[index].where)}</span> {html.escape(changes[index].why)}</a></li>'
            for index in groups[group]
        )
        parts.append(
            f'<details class="group" data-group="{html.escape(group)}"><summary>{html.escape(group)}'
            f' <span class="count">{len(groups[group])}</span></summary><ul>{entries}</ul></details>'
        )
    return f'<div id="{name}" class="grouping"{" hidden" if hidden else ""}>{"".join(parts)}</div>'
