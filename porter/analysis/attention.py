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
from porter.analysis.model_index import ClassInfo, ModelIndex

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
    # An eager core written inline in forward: the top-level statements [start, end] it spans.
    inline_region: tuple[int, int] | None = None
    inline_output: str | None = None  # the variable the region leaves the attention output in
    inline_scale: str | None = None
    alibi: bool = False  # the scores add an ALiBi bias
    merged_heads: bool = False  # the region ended by merging heads: the output is [T, H*D]
    core_args: list[str] | None = None  # the q, k, v variables the core reads


def analyse_attention(index: ModelIndex, name: str) -> AttentionInfo | None:
    info = index.classes[name]
    forward = info.methods.get("forward")
    if forward is None:
        return None
    statements = _flat_statements(forward.body.body)
    cores = [i for i, s in enumerate(statements) if _core_call(s, info, index)]
    inline = None
    if cores:
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
        names = [code_of(p) for p in positional[:3]]
        before, after, core_statement = statements[:core_at], statements[core_at + 1 :], statements[core_at]
    else:
        inline = _inline_core(list(forward.body.body), info)
        if inline is None:
            return None
        body = list(forward.body.body)
        start, end = inline["region"]
        core, core_statement, other_cores = None, body[end], []
        names = inline["qkv"]
        before, after = _flat_statements(body[:start]), _flat_statements(body[end + 1 :])
    linears = set(info.linears())
    q, k, v = (_source_projection(name, before, linears) for name in names)
    if None in (q, k, v):
        return None
    output_vars = set(statement_targets(core_statement)) if inline is None else {inline["output"]}
    output = _consumer(output_vars, after, linears)
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
    result = AttentionInfo(
        name, core, core_statement, other_cores, q, k, v, output, head_dim, num_heads, num_kv_heads
    )
    result.core_args = names
    if inline is not None:
        result.inline_region = inline["region"]
        result.inline_output = inline["output"]
        result.inline_scale = inline["scale"]
        result.alibi = inline["alibi"]
        result.merged_heads = inline["merged"]
    return result


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


SCORE_CALLS = ("matmul", "bmm", "baddbmm", "einsum")
RESHAPE_CALLS = ("view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten")


def _inline_core(body: list[cst.BaseStatement], info: ClassInfo) -> dict | None:
    """Finds `scores = q @ k^T (* scale, + alibi); probs = softmax(scores); out = probs @ v` among the
    top-level statements of forward, with the reshapes of q/k/v (and KV-head repetition) just
    before it and a head merge just after it: the span that one PagedAttention call replaces."""
    codes = [code_of(s) for s in body]
    soft = next((i for i, c in enumerate(codes) if "softmax(" in c), None)
    if soft is None:
        return None
    score_at = next((i for i in range(soft, -1, -1) if _score_call(body[i])), None)
    if score_at is None:
        return None
    q, k, scale = _score_operands(_score_call(body[score_at]), body[score_at])
    if q is None or k is None:
        return None
    probs = set(statement_targets(body[soft]))
    out_at = v = output = None
    for j in range(soft + 1, len(body)):
        call = _score_call(body[j])
        if call is not None and names_in(call) & probs:
            operands = [a.value for a in call.args if a.keyword is None]
            v = next((code_of(o) for o in operands if not names_in(o) & probs), None)
            out_at, output = j, next(iter(statement_targets(body[j])), None)
            break
        if names_in(body[j]) & probs:
            probs |= set(statement_targets(body[j]))
    if out_at is None or v is None or output is None:
        return None
    start = score_at
    while start > 0:  # q/k/v reshapes and KV-head repetition for the eager matmuls
        previous = body[start - 1]
        targets = set(statement_targets(previous))
        reshapes_itself = (
            targets
            and targets <= {q, k, v}
            and targets <= names_in(previous) - targets | targets
            and all(t in names_in(_value_of(previous)) for t in targets)
        )
        if not reshapes_itself or _calls_projection(previous, info):
            break
        start -= 1
    end, merged = out_at, False
    while end + 1 < len(body):  # a head merge of the output
        following = body[end + 1]
        if set(statement_targets(following)) != {output} or not _only_reshapes(following, info):
            break
        end, merged = end + 1, True
    return {
        "region": (start, end),
        "qkv": [q, k, v],
        "output": output,
        "scale": scale,
        "alibi": "alibi" in codes[score_at],
        "merged": merged,
    }


def _score_call(statement: cst.CSTNode) -> cst.Call | None:
    for call in _calls(statement):
        name = call.func.attr.value if isinstance(call.func, cst.Attribute) else (call_name(call) or "")
        if name in SCORE_CALLS:
            return call
    return None


def _score_operands(call: cst.Call, statement: cst.CSTNode) -> tuple[str | None, str | None, str]:
    """q and k of the score product (k without its transpose), and the scale it applies."""
    keywords = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    positional = [a.value for a in call.args if a.keyword is None]
    is_baddbmm = isinstance(call.func, cst.Attribute) and call.func.attr.value == "baddbmm"
    if is_baddbmm:
        first, second = keywords.get("batch1"), keywords.get("batch2")
        if first is None:  # torch.baddbmm(bias, q, k) or bias.baddbmm(q, k)
            offset = 1 if call_name(call) == "torch.baddbmm" else 0
            first, second = positional[offset], positional[offset + 1]
        scale = code_of(keywords["alpha"]) if "alpha" in keywords else "1.0"
    else:
        if len(positional) < 2:
            return None, None, "1.0"
        first, second = positional[0], positional[1]
        scale = "1.0"
        value = statement.body[0].value if isinstance(statement, cst.SimpleStatementLine) else None
        if isinstance(value, cst.BinaryOperation) and isinstance(value.operator, cst.Divide):
            scale = f"1 / ({code_of(value.right)})"
        elif isinstance(value, cst.BinaryOperation) and isinstance(value.operator, cst.Multiply):
            scale = code_of(value.right)
    while (
        isinstance(second, cst.Call)
        and isinstance(second.func, cst.Attribute)
        and second.func.attr.value in RESHAPE_CALLS
    ):
        second = second.func.value  # k^T -> k
    return (
        code_of(first) if isinstance(first, cst.Name) else None,
        code_of(second) if isinstance(second, cst.Name) else None,
        scale,
    )


def _value_of(statement: cst.CSTNode) -> cst.CSTNode:
    """The right-hand side of a simple assignment (the statement itself otherwise)."""
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign):
        return statement.body[0].value
    return statement


def _calls_projection(statement: cst.CSTNode, info: ClassInfo) -> bool:
    return any(self_attribute(c.func) in info.init_calls for c in _calls(statement))


def _only_reshapes(statement: cst.CSTNode, info: ClassInfo) -> bool:
    """`x = x.view(...)...` or `x = self._merge_heads(x)` with a method that builds no module."""
    for call in _calls(statement):
        method = self_attribute(call.func)
        if method in info.methods:
            if any(self_attribute(c.func) in info.init_calls for c in _calls(info.methods[method])):
                return False
        elif not (isinstance(call.func, cst.Attribute) and call.func.attr.value in RESHAPE_CALLS):
            return False
    return True
