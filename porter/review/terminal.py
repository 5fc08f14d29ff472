"""`porter review` in the terminal: review items, then every change grouped by place, stacked or
side by side (the source's lines next to the port's, for wide terminals)."""

from __future__ import annotations

import difflib

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from porter.review.model import Review, ReviewedChange
from porter.review.spans import Span, lines_of

# Lines of context shown around a change in the side-by-side view.
CONTEXT = 1
# Longest excerpt shown per side: the rest of a removed method is elided.
EXCERPT_LINES = 12


def selected_changes(review: Review, rule: str | None, where: str | None) -> list[ReviewedChange]:
    return [
        change
        for change in review.changes
        if (not rule or change.rule == rule) and (not where or change.where.startswith(where))
    ]


def render_review(
    console: Console, review: Review, changes: list[ReviewedChange], side_by_side: bool
) -> None:
    """Prints the review items, then `changes` under a rule per place."""
    if review.stale:
        console.print(Text(review.stale, style="bold yellow"))
    for item in review.items:
        place = f" (source line {item.source.start})" if item.source else ""
        console.print(
            Panel(
                Text(item.message),
                title=f"review item: {item.where}{place} ({item.rule})",
                border_style="yellow",
            )
        )
    source_lines = lines_of(review.source_text)
    port_lines = lines_of(review.port_text)
    current = None
    for change in changes:
        if change.where != current:
            current = change.where
            console.rule(f"[bold]{current}")
        places = f"  {_place('source', change.source)} -> {_place('port', change.port)}"
        console.print(Text.assemble((f"[{change.rule}] ", "cyan"), change.why, (places, "dim")))
        if side_by_side:
            console.print(_side_by_side(change, source_lines, port_lines))
            continue
        if change.before:
            console.print(_code(change.before), style="red")
        if change.after:
            console.print(_code(change.after), style="green")


def _side_by_side(change: ReviewedChange, source_lines: list[str], port_lines: list[str]) -> Table:
    table = Table(show_header=True, expand=True, box=None, padding=(0, 1))
    table.add_column(_place("source", change.source), ratio=1, overflow="fold")
    table.add_column(_place("port", change.port), ratio=1, overflow="fold")
    table.add_row(_excerpt(change.source, source_lines, "red"), _excerpt(change.port, port_lines, "green"))
    return table


def _excerpt(span: Span | None, lines: list[str], colour: str) -> Text:
    if span is None:
        return Text("(place unknown)", style="dim")
    first = max(span.start - CONTEXT, 1)
    last = min(max(span.end, span.start - 1) + CONTEXT, len(lines))
    shown = Text()
    for number in range(first, last + 1):
        if number - first >= EXCERPT_LINES:
            shown.append(f"      ... {last - number + 1} more lines\n", style="dim")
            break
        inside = span.start <= number <= span.end
        style = colour if inside else "dim"
        shown.append(f"{number:5} ", style="dim")
        shown.append(lines[number - 1] + "\n", style=style)
    if span.empty:
        shown.append(f"      (nothing here: before line {span.start})\n", style="dim italic")
    return shown


def _place(side: str, span: Span | None) -> str:
    if span is None:
        return f"{side} ?"
    if span.empty:
        return f"{side} before L{span.start}"
    return f"{side} L{span.start}" + (f"-{span.end}" if span.end != span.start else "")


def _code(code: str) -> Syntax:
    return Syntax(
        code, "python", theme="ansi_dark", background_color="default", line_numbers=False, code_width=100
    )


def unified_diff(source_text: str, generated: str, source_name: str, output_name: str) -> str:
    return "".join(
        difflib.unified_diff(
            source_text.splitlines(keepends=True),
            generated.splitlines(keepends=True),
            source_name,
            output_name,
        )
    )
