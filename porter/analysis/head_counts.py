"""How many query and KV heads a projection's output size holds, read from the constructor.

A separate projection sized `heads * head_dim` names its heads directly; a fused q|k|v projection
is sized `3 * E` (or `E * 3`), `E + 2 * kv` or `(H + 2 * kv) * head_dim`, possibly through a local set per
configuration (`if config.a: size = ... elif ...`), which gives counts that choose by the same
tests. Counts come back as source text valid in `__init__`.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.config_branches import branch_values, choice
from porter.analysis.cst_utils import call_name, code_of, init_attribute_values, self_attribute
from porter.analysis.model_index import ClassInfo


def init_attributes(info: ClassInfo) -> dict[str, cst.BaseExpression]:
    return init_attribute_values(info.methods.get("__init__"))


def projection_heads(info: ClassInfo, projection: str, head_dim: str) -> str:
    """Head count behind a separate q, k or v projection's output size, valid in __init__."""
    call = info.init_calls[projection]
    return _count(info, _out_expr(call), head_dim)


def fused_heads(info: ClassInfo, projection: str, head_dim: str) -> tuple[str, str] | None:
    """(query heads, KV heads) of one projection making q, k and v: `3 * E`, `E + 2 * kv` or
    `(H + 2 * kv) * head_dim`; a size held in a local set per configuration (`if config.a: size =
    ... elif ...: ... else: ...`) gives counts that choose by the same tests."""
    for call in info.all_init_calls.get(projection) or [info.init_calls[projection]]:
        out = _out_expr(call)
        counts = _three_part_heads(info, _local_value(info, out), head_dim)
        if counts is not None:
            return counts
        branches = branch_values(info.methods.get("__init__"), out)
        if branches:
            per_branch = [(test, _three_part_heads(info, value, head_dim)) for test, value in branches]
            if all(counts is not None for _, counts in per_branch):
                return (
                    choice([(test, counts[0]) for test, counts in per_branch]),
                    choice([(test, counts[1]) for test, counts in per_branch]),
                )
    return None  # (a configuration building only some of the three is a cross-attention variant)


def _three_part_heads(info: ClassInfo, out: cst.BaseExpression, head_dim: str) -> tuple[str, str] | None:
    if not isinstance(out, cst.BinaryOperation):
        return None
    if isinstance(out.operator, cst.Multiply) and "3" in (code_of(out.left), code_of(out.right)):
        heads = _count(info, out.right if code_of(out.left) == "3" else out.left, head_dim)
        return heads, heads
    if isinstance(out.operator, cst.Add):
        doubled = _doubled(out.right) or _doubled(out.left)
        if doubled is not None:
            single = out.left if _doubled(out.right) is not None else out.right
            return _count(info, single, head_dim), _count(info, doubled, head_dim)
    if isinstance(out.operator, cst.Multiply) and head_dim in (code_of(out.left), code_of(out.right)):
        # `(H + 2 * kv) * head_dim`: head counts in parentheses
        counts = out.left if code_of(out.right) == head_dim else out.right
        if isinstance(counts, cst.BinaryOperation) and isinstance(counts.operator, cst.Add):
            doubled = _doubled(counts.right) or _doubled(counts.left)
            if doubled is not None:
                single = counts.left if _doubled(counts.right) is not None else counts.right
                return code_of(single), code_of(doubled)
    return None


def _doubled(node: cst.BaseExpression) -> cst.BaseExpression | None:
    """`x` of `2 * x` or `x * 2`; `a * b` of a product with a factor 2 among others (`2 * a * b`)."""
    if isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Multiply):
        if code_of(node.left) == "2":
            return node.right
        if code_of(node.right) == "2":
            return node.left
        inner = _doubled(node.left)
        if inner is not None:
            return node.with_changes(left=inner)
    return None


def _count(info: ClassInfo, size: cst.BaseExpression, head_dim: str) -> str:
    """How many heads of `head_dim` make `size`, as simply as the source lets us say it."""
    if code_of(size) == head_dim:
        return "1"
    if isinstance(size, cst.BinaryOperation) and isinstance(size.operator, cst.Multiply):
        if code_of(size.right) == head_dim:
            return code_of(size.left)
        if code_of(size.left) == head_dim:
            return code_of(size.right)
    attributes = init_attributes(info)
    # `self.head_dim = <size> // <heads>` names the head count directly.
    definition = attributes.get(head_dim.removeprefix("self."))
    if (
        isinstance(definition, cst.BinaryOperation)
        and isinstance(definition.operator, cst.FloorDivide)
        and code_of(definition.left) == code_of(size)
    ):
        return code_of(definition.right)
    # `self.kv_dim = self.kv_heads * self.head_dim`: follow the attribute once.
    name = self_attribute(size)
    if name in attributes and not isinstance(attributes[name], cst.Name):
        inner = attributes[name]
        if isinstance(inner, cst.BinaryOperation) and isinstance(inner.operator, cst.Multiply):
            return _count(info, inner, head_dim)
    return f"({code_of(size)}) // {head_dim}"


def _local_value(info: ClassInfo, size: cst.BaseExpression) -> cst.BaseExpression:
    """What a local of `__init__` holds when `size` is one assigned exactly once at its top level
    (`op_size = H * head_dim + 2 * (kv * head_dim)`), else `size` itself."""
    init = info.methods.get("__init__")
    if init is None or not isinstance(size, cst.Name):
        return size
    values = [
        statement.body[0].value
        for statement in init.body.body
        if isinstance(statement, cst.SimpleStatementLine)
        and isinstance(statement.body[0], cst.Assign)
        and code_of(statement.body[0].targets[0].target) == size.value
        and len(statement.body[0].targets) == 1
    ]
    return values[0] if len(values) == 1 else size


def _out_expr(call: cst.Call) -> cst.BaseExpression:
    return call.args[1].value if call_name(call) != "Conv1D" else call.args[0].value
