"""`porter review`: every change a port makes, where, and why, like a reviewer's pass over the diff."""

from __future__ import annotations

import difflib

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from porter.pipeline import PortResult


def render_review(
    result: PortResult, console: Console, rule: str | None = None, where: str | None = None
) -> int:
    """Prints review items, then the changes grouped by class and method; returns how many it showed."""
    for item in result.review:
        console.print(
            Panel(Text(item.message), title=f"review item: {item.where} ({item.rule})", border_style="yellow")
        )
    shown = 0
    current = None
    for change in result.changes:
        if rule and change.rule != rule:
            continue
        if where and not change.where.startswith(where):
            continue
        if change.where != current:
            current = change.where
            console.rule(f"[bold]{current}")
        shown += 1
        console.print(Text.assemble((f"[{change.rule}] ", "cyan"), change.reason))
        if change.before:
            console.print(
                Syntax(
                    change.before,
                    "python",
                    theme="ansi_dark",
                    background_color="default",
                    line_numbers=False,
                    code_width=100,
                ),
                style="red",
            )
        if change.after:
            console.print(
                Syntax(
                    change.after,
                    "python",
                    theme="ansi_dark",
                    background_color="default",
                    line_numbers=False,
                    code_width=100,
                ),
                style="green",
            )
    return shown


def unified_diff(source_text: str, generated: str, source_name: str, output_name: str) -> str:
    return "".join(
        difflib.unified_diff(
            source_text.splitlines(keepends=True),
            generated.splitlines(keepends=True),
            source_name,
            output_name,
        )
    )
