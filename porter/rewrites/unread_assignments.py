"""Assignments nothing reads any more, removed from a function: a helper the rewrites that leave
such assignments behind share (dead-code, flatten-batch, fuse-qkv, prune); not a rewrite itself."""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import statement_targets
from porter.rewrites.base import PortContext
from porter.rewrites.statement_pruner import (
    assigned_anywhere,
    calls_anything,
    calls_submodule,
    names_read,
)


def drop_unread_assignments(function: cst.FunctionDef, context: PortContext, where: str) -> cst.FunctionDef:
    """Removes top-level assignments whose names nothing reads any more (a mask function chosen for
    a mask that is gone; a size an earlier rewrite no longer needs), and `if` chains that only
    assign such names; likewise inside a top-level `for` body (`layer_type =
    self.config.layer_types[i]` once the per-layer-type mask it picked is gone), as long as the loop
    keeps a statement; and loops left with nothing but `pass`. Statements that call a submodule
    stay: they compute the model."""
    while True:
        body = list(function.body.body)
        position = _first_unread(body, [], allow_if=True, pure=context.plan.alibi_builders)
        if position is None:
            position = next((i for i, s in enumerate(body) if _empty_loop(s)), None)
        if position is not None:
            context.record("dead-code", where, body[position], "", "nothing reads it")
            del body[position]
        else:
            for index, loop in enumerate(body):
                if not (
                    isinstance(loop, cst.For)
                    and isinstance(loop.body, cst.IndentedBlock)
                    and len(loop.body.body) > 1
                ):
                    continue
                inner = list(loop.body.body)
                position = _first_unread(inner, [*body[:index], *body[index + 1 :], loop.target, loop.iter])
                if position is not None:
                    context.record("dead-code", where, inner[position], "", "nothing reads it")
                    del inner[position]
                    body[index] = loop.with_changes(body=loop.body.with_changes(body=inner))
                    break
            else:
                return function
        function = function.with_changes(body=function.body.with_changes(body=body))


def _empty_loop(statement: cst.BaseStatement) -> bool:
    """A `for` whose body is only `pass` (what is left once its statements went) over an iterable
    that runs no submodule: OLMo3's loop over layer types that built per-type masks."""
    return (
        isinstance(statement, cst.For)
        and statement.orelse is None
        and isinstance(statement.body, cst.IndentedBlock)
        and all(
            isinstance(s, cst.SimpleStatementLine) and all(isinstance(x, cst.Pass) for x in s.body)
            for s in statement.body.body
        )
        and not calls_submodule(statement.iter)
    )


def _first_unread(
    statements: list[cst.CSTNode],
    outside: list[cst.CSTNode],
    allow_if: bool = False,
    pure: set[str] | frozenset[str] = frozenset(),
) -> int | None:
    """Index of the first statement that only assigns names nothing else reads (neither the other
    `statements` nor `outside`) and calls no submodule; an `if` chain counts when `allow_if` and it
    calls nothing at all. Calls named in `pure` (an ALiBi builder: the engine applies the bias from
    slopes, so nothing reads what it built) compute nothing the model needs."""
    for position, statement in enumerate(statements):
        if isinstance(statement, cst.If):
            assigned = assigned_anywhere(statement)
            if not allow_if or not assigned or calls_anything(statement):
                continue
            targets = assigned
        else:
            targets = set(statement_targets(statement))
            if (
                not targets
                or not isinstance(statement, cst.SimpleStatementLine)
                or calls_submodule(statement, pure)
            ):
                continue
        others = [*statements[:position], *statements[position + 1 :], *outside]
        if not any(targets & names_read(other) for other in others):
            return position
    return None
