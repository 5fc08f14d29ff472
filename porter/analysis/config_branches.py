"""Values a class sets per configuration: `if config.a: x = ... elif config.b: x = ... else: x = ...`
in `__init__`, and the one expression that chooses among them by the same tests."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, statement_targets


def branch_values(
    init: cst.FunctionDef | None, out: cst.BaseExpression
) -> list[tuple[str | None, cst.BaseExpression]]:
    """[(test, value), ..., (None, else value)] of a local `out` assigned once in every branch of an
    if/elif/else chain of `__init__` (empty when it is not built that way)."""
    if init is None or not isinstance(out, cst.Name):
        return []
    for statement in init.body.body:
        if not isinstance(statement, cst.If):
            continue
        branches: list[tuple[str | None, cst.BaseExpression]] = []
        node: cst.If | cst.Else | None = statement
        while node is not None:
            values = [
                s.body[0].value
                for s in node.body.body
                if isinstance(s, cst.SimpleStatementLine)
                and isinstance(s.body[0], cst.Assign)
                and statement_targets(s) == [out.value]
            ]
            if len(values) != 1:
                break
            branches.append((code_of(node.test) if isinstance(node, cst.If) else None, values[0]))
            node = node.orelse if isinstance(node, cst.If) else None
        if branches and branches[-1][0] is None:
            return branches
    return []


def choice(options: list[tuple[str | None, str]]) -> str:
    """`a if test_1 else b if test_2 else c`, with branches that agree with what follows merged."""
    merged: list[tuple[str | None, str]] = []
    for test, value in reversed(options):
        if merged and merged[0][1] == value:
            continue  # `b if t else <chain starting with b>` is that chain
        merged.insert(0, (test, value))
    text = merged[-1][1]
    for test, value in reversed(merged[:-1]):
        text = f"{value} if {test} else {text}"
    return text if len(merged) == 1 else f"({text})"
