"""A fused q|k|v split inline, one branch per configuration's layout, becomes a split by this rank's sizes.

Some attention forwards view the fused projection's output into heads (`fused = self.qkv(x).view(
..., -1, head_dim)`) and pick q, k and v out of it in an `if` / `elif` / `else` chain, one branch
per checkpoint layout. Every branch of the chain only assigns from the fused tensor, and together
they leave q, k and v (what the attention core reads). Each branch's head-axis operations tell its
layout:
- `fused.unflatten(-2, (heads, 3))` (or a view ending `(heads, 3, head_dim)`): q, k and v side by
  side per head, "per_head";
- `fused.view(..., groups, -1, head_dim)` cut by `[..., :-2, :]`, `[..., -2, :]`, `[..., -1, :]`:
  per KV group its queries, then one key and one value, "grouped";
- `fused.split([heads, 1, 1], dim=-2)`: all queries, one key, one value; grouped with one group.
- `fused.split([q, kv, kv], dim=-1)` of the flat output: all queries, all keys, all values,
  "concatenated"; beside a per-head else (a view into `(heads, 3 * head_dim)` cut in three by a
  function of the file that only splits), the checkpoint loads by the chain's own test.
Per head is grouped with one query per group, so a chain of these loads "grouped" for every
configuration. In the port the projection is a `QKVParallelLinear` whose output on each rank is
`[q | k | v]` of this rank's heads, and the chain becomes one split by its sizes, each part viewed
into heads. A chain that picks q, k and v out of the fused tensor in a way none of these describe
is a review item: left as it is, each rank would cut its shard at the global head counts.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import (
    call_name,
    calls_in,
    code_of,
    names_in,
    self_attribute,
    statement_targets,
)
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class SplitInBranches(Rewrite):
    name = "qkv-split-branches"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        found: dict[
            str, tuple[int, str, str]
        ] = {}  # class -> (position of the if, fused name, its flat form)
        for name, info in context.plan.attention.items():
            if len({info.query, info.key, info.value}) != 1 or not info.core_args:
                continue
            forward = context.index.classes[name].methods.get("forward")
            if forward is None:
                continue
            located = _branch_split(
                list(forward.body.body),
                info.query,
                set(info.core_args[:3]),
                info.head_dim,
                _splitting_functions(context.index.functions),
            )
            if located is None:
                continue
            position, fused, flat, layout = located
            if layout is None:
                context.flag(
                    "qkv-split-branches",
                    f"{name}.forward",
                    f"picks q, k and v out of {info.query}'s output in branches whose layout porter cannot "
                    "read; sharded as one column-parallel Linear it would give wrong heads at tp > 1",
                )
                continue
            found[name] = (position, fused, flat)
            context.plan.concatenated_qkv.add((name, info.query))
            context.plan.qkv_layouts[(name, info.query)] = (
                [(layout, None)] if isinstance(layout, str) else layout
            )
        if not found:
            return module
        return module.visit(_Transformer(context, found))


def _branch_split(
    body: list[cst.BaseStatement], projection: str, qkv: set[str], head_dim: str, splitters: set[str]
) -> tuple[int, str, str, str | list | None] | None:
    """(position of the `if`, the fused name, that tensor flat `[T, (q|k|v) * head_dim]`, the layout or
    None where a branch is unreadable) of the chain that splits the projection's output, if any.
    Where an if/else's two branches read two layouts of which one is not grouped, the layout is
    [(layout, (test, "body")), (layout, (test, "orelse"))], for the checkpoint to load by that test.
    `splitters`: this file's functions that only split a tensor."""
    fused: dict[str, str] = {}  # name holding the projection's output -> that output flat
    shapes: dict[str, str] = {}  # name -> the tuple it holds (`hidden_shape = (*input_shape, -1, d)`)
    for position, statement in enumerate(body):
        if isinstance(statement, cst.SimpleStatementLine):
            targets = statement_targets(statement)
            value = getattr(statement.body[0], "value", None)
            if len(targets) == 1 and isinstance(value, cst.BaseExpression):
                flat = _flat_form(targets[0], value, projection, head_dim, shapes)
                if flat is not None:
                    fused[targets[0]] = flat
                else:
                    fused.pop(targets[0], None)
                if isinstance(value, cst.Tuple):
                    shapes[targets[0]] = code_of(value)
            continue
        if not (isinstance(statement, cst.If) and fused):
            continue
        branches = _branches(statement)
        if branches is None:
            continue
        sources = {name for name in fused if any(name in names_in(s) for b in branches for s in b)}
        if len(sources) != 1:
            continue
        (source,) = sources
        if not all(_assigns_only_from(branch, source, qkv, splitters) for branch in branches):
            continue
        layouts = [_layout(branch, head_dim, source, splitters) for branch in branches]
        if None in layouts or not layouts:
            return position, source, fused[source], None
        if "concatenated" not in layouts:
            return position, source, fused[source], "grouped"
        if len(layouts) != 2:
            return position, source, fused[source], None
        test = code_of(statement.test)
        per_test = [(layouts[0], (test, "body")), (layouts[1], (test, "orelse"))]
        return position, source, fused[source], per_test
    return None


def _flat_form(
    name: str, value: cst.BaseExpression, projection: str, head_dim: str, shapes: dict[str, str]
) -> str | None:
    """`name` for `name = self.qkv(x)`; `name.flatten(-2)` for `name = self.qkv(x).view(..., -1,
    head_dim)` (the sizes written out or a tuple assigned before)."""
    if isinstance(value, cst.Call) and self_attribute(value.func) == projection:
        return name
    if not (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and value.func.attr.value in ("view", "reshape")
        and isinstance(value.func.value, cst.Call)
        and self_attribute(value.func.value.func) == projection
        and value.args
    ):
        return None
    sizes = [code_of(a.value) for a in value.args]
    if len(sizes) == 1 and sizes[0] in shapes:
        sizes = [code_of(e.value) for e in cst.parse_expression(shapes[sizes[0]]).elements]
    sizes = [size.replace(" ", "") for size in sizes]
    if sizes[-2:] == ["-1", head_dim.replace(" ", "")]:
        return f"{name}.flatten(-2)"
    return None


def _branches(chain: cst.If) -> list[list[cst.BaseStatement]] | None:
    """The statement lists of an `if` / `elif` / `else` chain that ends in `else` (every case covered)."""
    found = []
    node: cst.If | cst.Else | None = chain
    while isinstance(node, cst.If):
        found.append(list(node.body.body))
        node = node.orelse
    if not isinstance(node, cst.Else):
        return None
    found.append(list(node.body.body))
    return found


def _splitting_functions(functions: dict[str, cst.FunctionDef]) -> set[str]:
    """This file's functions that only cut a tensor into parts: they call nothing of the model,
    and `torch.split` or a tensor's `.split`/`.chunk` (Megatron's `split_tensor_along_last_dim`)."""
    found = set()
    for name, function in functions.items():
        called = {(call_name(c) or "").rpartition(".")[2] for c in calls_in(function)}
        if called & {"split", "chunk"} and not any(self_attribute(c.func) for c in calls_in(function)):
            found.add(name)
    return found


def _assigns_only_from(
    branch: list[cst.BaseStatement], source: str, qkv: set[str], splitters: set[str] = frozenset()
) -> bool:
    """Each statement a simple assignment; together they assign q, k and v, reading only `source`,
    what the branch assigned before, `self`, and this file's functions that only split."""
    known = {source, "self", *splitters}
    for statement in branch:
        if not (isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.Assign)):
            return False
        if any(self_attribute(call.func) for call in calls_in(statement)):
            return False  # it runs a method or submodule: more than a split
        value = statement.body[0].value
        read = names_in(value) - known
        if read - {"input_shape"} and not read <= _size_names(value):
            return False
        known |= set(statement_targets(statement))
    return qkv <= known


def _size_names(value: cst.BaseExpression) -> set[str]:
    """Names read only as sizes of a view (`fused.view(*input_shape, groups, -1, d)`)."""
    found: set[str] = set()
    for call in calls_in(value):
        if isinstance(call.func, cst.Attribute) and call.func.attr.value in ("view", "reshape"):
            for arg in call.args:
                found |= names_in(arg.value)
    return found


def _layout(
    branch: list[cst.BaseStatement], head_dim: str, source: str = "", splitters: set[str] = frozenset()
) -> str | None:
    code = "\n".join(code_of(s) for s in branch).replace(" ", "")
    dim = head_dim.replace(" ", "")
    for call in (c for s in branch for c in calls_in(s)):
        # `source.split([q, kv, kv], dim=-1)` of the flat output: all queries, all keys, all values.
        if (
            isinstance(call.func, cst.Attribute)
            and call.func.attr.value == "split"
            and code_of(call.func.value) == source
            and len(call.args) == 2
            and isinstance(call.args[0].value, cst.List)
            and len(call.args[0].value.elements) == 3
            and call.args[1].keyword is not None
            and call.args[1].keyword.value == "dim"
            and code_of(call.args[1].value).replace(" ", "") == "-1"
        ):
            return "concatenated"
    # viewed into heads of q|k|v (`(heads, 3 * head_dim)`), then cut in three by a splitting function
    if f"3*{dim})" in code and any(
        call_name(c) in splitters and len(c.args) >= 2 and code_of(c.args[1].value) == "3"
        for s in branch
        for c in calls_in(s)
    ):
        return "per_head"
    for call in (c for s in branch for c in calls_in(s)):
        if not isinstance(call.func, cst.Attribute):
            continue
        method = call.func.attr.value
        args = [
            (f"{a.keyword.value}=" if a.keyword else "") + code_of(a.value).replace(" ", "")
            for a in call.args
        ]
        if method == "unflatten" and len(args) == 2 and args[0] == "-2" and args[1].endswith(",3)"):
            return "per_head"
        if method in ("view", "reshape") and len(args) >= 3 and args[-2:] == ["3", head_dim.replace(" ", "")]:
            return "per_head"
        if method == "split" and len(args) == 2 and args[1] == "dim=-2" and args[0].endswith(",1,1]"):
            return "grouped"
        if (
            method in ("view", "reshape")
            and len(args) >= 3
            and args[-2:] == ["-1", head_dim.replace(" ", "")]
            and all(cut in code for cut in ("[...,:-2,:]", "[...,-2,:]", "[...,-1,:]"))
        ):
            return "grouped"
    return None


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, found: dict[str, tuple[int, str, str]]) -> None:
        super().__init__(context)
        self.found = found

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        entry = self.found.get(self.current_class or "")
        if entry is None or self.current_function != "forward" or len(self.function_stack) != 1:
            return super().leave_FunctionDef(original, updated)
        position, _, flat = entry
        info = self.context.plan.attention[self.current_class]
        q, k, v = info.core_args[:3]
        projection = info.query
        sizes = f"[self.{projection}.q_size, self.{projection}.kv_size, self.{projection}.kv_size]"
        new = cst.parse_statement(
            f"{q}, {k}, {v} = (part.unflatten(-1, (-1, {info.head_dim})) "
            f"for part in {flat}.split({sizes}, dim=-1))"
        )
        body = list(updated.body.body)
        self.context.record(
            "qkv-split-branches",
            self.where,
            body[position],
            new,
            "this rank's q, k and v of the fused projection, in every configuration's layout (grouped)",
        )
        body[position] = new
        updated = updated.with_changes(body=updated.body.with_changes(body=body))
        return super().leave_FunctionDef(original, updated)
