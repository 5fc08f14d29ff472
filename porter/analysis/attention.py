"""What an attention class computes, read from its code: which projections make q, k and v, which
one takes the output, how many heads of what size, and the attention core's arguments."""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from porter.analysis.cst_utils import (
    call_name,
    code_of,
    init_attribute_values,
    names_in,
    self_attribute,
    statement_targets,
)
from porter.analysis.model_index import LINEAR_CALLS, ClassInfo, ModelIndex

HEAD_DIM_WORDS = ("head_dim", "head_size", "attention_head_size", "hidden_size_per_attention_head")


@dataclass(slots=True)
class AttentionInfo:
    name: str
    core: cst.Call  # the call that computes attention (HF interface or eager function)
    core_statement: cst.SimpleStatementLine
    other_cores: list[cst.SimpleStatementLine]  # alternative backends in other branches (upcast/eager paths)
    query: str  # projection attributes; the same one three times for a fused projection
    key: str
    value: str
    output: str | None
    head_dim: str  # expressions valid inside __init__
    num_heads: str
    num_kv_heads: str


def analyse_attention(index: ModelIndex, name: str) -> AttentionInfo | None:
    info = index.classes[name]
    forward = info.methods.get("forward")
    if forward is None:
        return None
    statements = _flat_statements(forward.body.body)
    cores = [i for i, s in enumerate(statements) if _core_call(s, info, index)]
    if not cores:
        return None
    # Several backends in branches: take HF's interface dispatch, whose arguments are the standard ones.
    core_at = next(
        (i for i in cores if call_name(_core_call(statements[i], info, index)) == "attention_interface"),
        cores[0],
    )
    core = _core_call(statements[core_at], info, index)
    other_cores = [statements[i] for i in cores if i != core_at]
    positional = [a.value for a in core.args if a.keyword is None and not a.star]
    if positional and code_of(positional[0]) == "self":
        positional = positional[1:]
    if len(positional) < 3:
        return None
    linears = set(info.linears())
    q, k, v = (_source_projection(code_of(p), statements[:core_at], linears) for p in positional[:3])
    if None in (q, k, v):
        return None
    output_vars = set(statement_targets(statements[core_at]))
    output = _consumer(output_vars, statements[core_at + 1 :], linears)
    head_dim = next((f"self.{a}" for a in _init_attributes(info) if a in HEAD_DIM_WORDS), None)
    if head_dim is None:
        return None
    if q == k == v:  # one projection makes q, k and v
        counts = _fused_heads(info, q, head_dim)
        if counts is None:
            return None
        num_heads, num_kv_heads = counts
    else:
        num_heads = _heads(info, q, head_dim)
        num_kv_heads = num_heads if k == q else _heads(info, k, head_dim)
    return AttentionInfo(
        name, core, statements[core_at], other_cores, q, k, v, output, head_dim, num_heads, num_kv_heads
    )


def _flat_statements(body) -> list[cst.SimpleStatementLine]:
    result = []
    for statement in body:
        if isinstance(statement, cst.SimpleStatementLine):
            result.append(statement)
        elif hasattr(statement, "body") and hasattr(statement.body, "body"):
            result.extend(_flat_statements(statement.body.body))
            orelse = getattr(statement, "orelse", None)
            while orelse is not None:  # else / elif chains
                result.extend(_flat_statements(orelse.body.body))
                orelse = getattr(orelse, "orelse", None)
    return result


def _core_call(statement: cst.CSTNode, info: ClassInfo, index: ModelIndex) -> cst.Call | None:
    found: list[cst.Call] = []

    class _Find(cst.CSTVisitor):
        def visit_Call(self, node: cst.Call) -> None:
            name = call_name(node) or ""
            method = self_attribute(node.func)
            if name == "attention_interface" or (
                name in index.functions and "softmax" in code_of(index.functions[name])
            ):
                found.append(node)
            elif method in info.methods and "softmax" in code_of(info.methods[method]):
                found.append(node)

    statement.visit(_Find())
    return found[0] if found else None


def _source_projection(var: str, statements: list, linears: set[str]) -> str | None:
    """The Linear attribute whose output flows into `var` (following reassignments backwards)."""
    wanted = {var}
    for statement in reversed(statements):
        targets = set(statement_targets(statement))
        if not targets & wanted:
            continue
        called = [self_attribute(c.func) for c in _calls(statement)]
        hits = [c for c in called if c in linears]
        if hits:
            return hits[0]
        wanted |= names_in(statement) - targets - {"self"}
    return None


def _consumer(vars_: set[str], statements: list, linears: set[str]) -> str | None:
    live = set(vars_)
    for statement in statements:
        if names_in(statement) & live:
            hits = [self_attribute(c.func) for c in _calls(statement) if self_attribute(c.func) in linears]
            if hits:
                return hits[0]
            live |= set(statement_targets(statement))
    return None


def _calls(node: cst.CSTNode) -> list[cst.Call]:
    calls: list[cst.Call] = []

    class _Collect(cst.CSTVisitor):
        def visit_Call(self, call: cst.Call) -> None:
            calls.append(call)

    node.visit(_Collect())
    return calls


def _init_attributes(info: ClassInfo) -> dict[str, cst.BaseExpression]:
    return init_attribute_values(info.methods.get("__init__"))


def _heads(info: ClassInfo, projection: str, head_dim: str) -> str:
    """Head count behind a separate q, k or v projection's output size, valid in __init__."""
    call = info.init_calls[projection]
    return _count(info, _out_expr(call), head_dim)


def _fused_heads(info: ClassInfo, projection: str, head_dim: str) -> tuple[str, str] | None:
    """(query heads, KV heads) of one projection making q, k and v: `3 * E` or `E + 2 * kv`."""
    for call in info.all_init_calls.get(projection) or [info.init_calls[projection]]:
        out = _out_expr(call)
        if (
            isinstance(out, cst.BinaryOperation)
            and isinstance(out.operator, cst.Multiply)
            and code_of(out.left) == "3"
        ):
            heads = _count(info, out.right, head_dim)
            return heads, heads
        if isinstance(out, cst.BinaryOperation) and isinstance(out.operator, cst.Add):
            right = out.right
            if (
                isinstance(right, cst.BinaryOperation)
                and isinstance(right.operator, cst.Multiply)
                and code_of(right.left) == "2"
            ):
                return _count(info, out.left, head_dim), _count(info, right.right, head_dim)
    return None  # (a configuration building only some of the three is a cross-attention variant)


def _count(info: ClassInfo, size: cst.BaseExpression, head_dim: str) -> str:
    """How many heads of `head_dim` make `size`, as simply as the source lets us say it."""
    if isinstance(size, cst.BinaryOperation) and isinstance(size.operator, cst.Multiply):
        if code_of(size.right) == head_dim:
            return code_of(size.left)
        if code_of(size.left) == head_dim:
            return code_of(size.right)
    attributes = _init_attributes(info)
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


def _out_expr(call: cst.Call) -> cst.BaseExpression:
    return call.args[1].value if call_name(call) != "Conv1D" else call.args[0].value


def _out_size(call: cst.Call) -> str:
    return code_of(call.args[1].value if call_name(call) != "Conv1D" else call.args[0].value)


def is_linear(call: cst.Call) -> bool:
    return call_name(call) in LINEAR_CALLS
