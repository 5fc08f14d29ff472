"""A temporary passed straight on to another name (`outputs = self.model(...)` then `hidden_states =
outputs`, nothing else reading `outputs`) becomes one assignment to the final name: a helper of the
hf-leftovers rewrite."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of
from porter.rewrites.base import PortContext


def fold_passed_on(function: cst.FunctionDef, context: PortContext, where: str) -> cst.FunctionDef:
    counts: dict[str, int] = {}

    class _Count(cst.CSTVisitor):
        def visit_Name(self, node: cst.Name) -> None:
            counts[node.value] = counts.get(node.value, 0) + 1

    function.body.visit(_Count())
    return function.with_changes(body=_fold(function.body, counts, context, where))


def _fold(block: cst.BaseSuite, counts: dict[str, int], context: PortContext, where: str) -> cst.BaseSuite:
    if not isinstance(block, cst.IndentedBlock):
        return block
    body: list[cst.BaseStatement] = []
    for statement in block.body:
        if isinstance(statement, (cst.For, cst.While, cst.If, cst.With)):
            statement = statement.with_changes(body=_fold(statement.body, counts, context, where))
        previous = body[-1] if body else None
        value = _temporary_value(previous, statement, counts)
        if value is not None:
            target = statement.body[0].targets[0]
            folded = previous.with_changes(
                body=[cst.Assign(targets=[target], value=value)],
                # the second statement's comments stay, its blank lines go with it
                leading_lines=[
                    *previous.leading_lines,
                    *(line for line in statement.leading_lines if line.comment),
                ],
                trailing_whitespace=statement.trailing_whitespace,
            )
            context.record(
                "hf-leftovers",
                where,
                f"{code_of(previous).strip()}\n{code_of(statement).strip()}",
                folded,
                "a temporary passed straight on",
            )
            body[-1] = folded
            continue
        body.append(statement)
    return block.with_changes(body=body)


def _temporary_value(first, second, counts: dict[str, int]) -> cst.BaseExpression | None:
    """The value of `first` when it is `a = value` (or `a: T = value`) and `second` is `b = a`,
    with `a` read nowhere else."""
    if not (isinstance(first, cst.SimpleStatementLine) and isinstance(second, cst.SimpleStatementLine)):
        return None
    if len(first.body) != 1 or len(second.body) != 1:
        return None
    small, passed = first.body[0], second.body[0]
    if isinstance(small, cst.Assign) and len(small.targets) == 1:
        target = small.targets[0].target
    elif isinstance(small, cst.AnnAssign) and small.value is not None:
        target = small.target
    else:
        return None
    if not (
        isinstance(target, cst.Name)
        and isinstance(passed, cst.Assign)
        and len(passed.targets) == 1
        and isinstance(passed.targets[0].target, cst.Name)
        and isinstance(passed.value, cst.Name)
        and passed.value.value == target.value
        and counts.get(target.value) == 2
    ):
        return None
    return small.value
