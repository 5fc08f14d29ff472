"""Shapes kept from the batched layout, used only to split heads off and merge them back: a helper
of the hf-leftovers rewrite.

`input_shape = x.shape[:-1]` and `hidden_shape = (*input_shape, -1, D)` are HF's way to view
`[batch, seq, heads * D]` as heads. The engine's hidden states are `[tokens, hidden]`, so
`.view(hidden_shape)` is `.unflatten(-1, (-1, D))` and `.reshape(*input_shape, -1)` is
`.flatten(1)`. Applied only when that leaves both shapes unread, and then they go.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, names_in
from porter.rewrites.base import PortContext

SHAPE_METHODS = {"view", "reshape"}


def drop_batch_shapes(function: cst.FunctionDef, context: PortContext, where: str) -> cst.FunctionDef:
    leading: str | None = None  # `input_shape`
    heads: dict[str, cst.BaseExpression] = {}  # `hidden_shape` -> D
    for statement in function.body.body:
        if not (isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1):
            continue
        small = statement.body[0]
        if not (isinstance(small, cst.Assign) and len(small.targets) == 1):
            continue
        name = small.targets[0].target
        if not isinstance(name, cst.Name):
            continue
        if _leading_dims(small.value):
            leading = name.value
        elif leading and _head_shape(small.value, leading) is not None:
            heads[name.value] = _head_shape(small.value, leading)
    if leading is None:
        return function
    rewritten = function.body.visit(_Replace(leading, heads))
    defined = {leading, *heads}
    kept = [s for s in rewritten.body if not (set(_targets(s)) & defined)]
    if any(defined & names_in(s) for s in kept):
        return function  # a shape read some other way: leave the batched spelling whole
    gone = [code_of(s).strip() for s in rewritten.body if set(_targets(s)) & defined]
    context.record(
        "hf-leftovers", where, "\n".join(gone), "", "heads split and merged on [tokens, hidden] directly"
    )
    return function.with_changes(body=rewritten.with_changes(body=kept))


def _targets(statement: cst.BaseStatement) -> list[str]:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        small = statement.body[0]
        if (
            isinstance(small, cst.Assign)
            and len(small.targets) == 1
            and isinstance(small.targets[0].target, cst.Name)
        ):
            return [small.targets[0].target.value]
    return []


def _leading_dims(value: cst.BaseExpression) -> bool:
    """`x.shape[:-1]`."""
    if not (isinstance(value, cst.Subscript) and isinstance(value.value, cst.Attribute)):
        return False
    if value.value.attr.value != "shape" or len(value.slice) != 1:
        return False
    piece = value.slice[0].slice
    return (
        isinstance(piece, cst.Slice)
        and piece.lower is None
        and piece.step is None
        and piece.upper is not None
        and code_of(piece.upper).strip() == "-1"
    )


def _head_shape(value: cst.BaseExpression, leading: str) -> cst.BaseExpression | None:
    """D of `(*leading, -1, D)`."""
    if not (isinstance(value, cst.Tuple) and len(value.elements) == 3):
        return None
    first, second, third = (e for e in value.elements)
    if not (isinstance(first, cst.StarredElement) and code_of(first.value).strip() == leading):
        return None
    if code_of(second.value).strip() != "-1":
        return None
    return third.value


class _Replace(cst.CSTTransformer):
    def __init__(self, leading: str, heads: dict[str, cst.BaseExpression]) -> None:
        self.leading, self.heads = leading, heads

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        func = updated.func
        if not (isinstance(func, cst.Attribute) and func.attr.value in SHAPE_METHODS):
            return updated
        args = [code_of(a).strip().rstrip(",").strip() for a in updated.args]
        if len(args) == 1 and args[0].lstrip("*") in self.heads:  # `.view(shape)` or `.view(*shape)`
            size = self.heads[args[0].lstrip("*")]
            return _call(func.value, "unflatten", f"-1, (-1, {code_of(size).strip()})")
        if args == [f"*{self.leading}", "-1"]:
            return _call(func.value, "flatten", "1")
        return updated


def _call(receiver: cst.BaseExpression, method: str, arguments: str) -> cst.Call:
    call = cst.parse_expression(f"x.{method}({arguments})")
    return call.with_changes(func=call.func.with_changes(value=receiver))
