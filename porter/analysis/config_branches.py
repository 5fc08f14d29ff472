"""Values a class sets per configuration: `if config.a: x = ... elif config.b: x = ... else: x = ...`
in `__init__`, and the one expression that chooses among them by the same tests."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of


def branch_values(
    init: cst.FunctionDef | None, out: cst.BaseExpression
) -> list[tuple[str | None, cst.BaseExpression]]:
    """[(test, value), ..., (None, else value)] of a local or `self.` attribute `out` assigned once
    in every branch of an if/elif/else chain of `__init__`, or assigned at the top level and then
    again in the branches of a chain with no else (`self.size = 3 * e`; `if config.mq: self.size =
    ...`): the top-level value is the else (empty when it is not built that way)."""
    if init is None or not isinstance(out, (cst.Name, cst.Attribute)):
        return []
    target = code_of(out)
    default: cst.BaseExpression | None = None
    for statement in init.body.body:
        if isinstance(statement, cst.SimpleStatementLine):
            if _assigned_value(statement, target) is not None:
                default = _assigned_value(statement, target)
            continue
        if not isinstance(statement, cst.If):
            continue
        branches: list[tuple[str | None, cst.BaseExpression]] = []
        node: cst.If | cst.Else | None = statement
        while node is not None:
            values = [v for s in node.body.body if (v := _assigned_value(s, target)) is not None]
            if len(values) != 1:
                break
            branches.append((code_of(node.test) if isinstance(node, cst.If) else None, values[0]))
            node = node.orelse if isinstance(node, cst.If) else None
        if branches and branches[-1][0] is None:
            return branches
        if branches and node is None and default is not None:
            return [*branches, (None, default)]
    return []


def _assigned_value(statement: cst.CSTNode, target: str) -> cst.BaseExpression | None:
    """The value of `<target> = value` when `statement` is that one assignment."""
    if (
        isinstance(statement, cst.SimpleStatementLine)
        and isinstance(statement.body[0], cst.Assign)
        and len(statement.body[0].targets) == 1
        and code_of(statement.body[0].targets[0].target) == target
    ):
        return statement.body[0].value
    return None


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
