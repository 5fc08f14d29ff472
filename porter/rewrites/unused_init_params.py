"""`__init__` parameters nothing reads leave the signature and every call of the class.

A helper of the unread-attributes rewrite: once `self.layer_idx = layer_idx` is gone, the
attention's `layer_idx` parameter reads nothing, so it goes, and so does the `layer_idx=layer_idx`
each construction passes. Only classes the file constructs by plain calls qualify: a class that is
a base, sits in a table or is passed around may be called in ways the file does not show, and the
causal LM is constructed by the engine. `**kwargs` that no call fills goes the same way; a loop
variable of a comprehension that no longer reads it becomes `_`.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.attribute_reads import is_pure
from porter.analysis.cst_utils import code_of, names_in
from porter.rewrites.base import PortContext


def drop_unused_init_params(module: cst.Module, context: PortContext) -> cst.Module:
    removed: dict[str, dict[str, int | None]] = {}  # class -> parameter -> its position (None: keyword-only)
    uses = _Uses()
    module.visit(uses)
    for statement in module.body:
        if not isinstance(statement, cst.ClassDef) or statement.name.value == context.index.causal_lm:
            continue
        calls = uses.plain_calls(statement.name.value)
        init = next(
            (i for i in statement.body.body if isinstance(i, cst.FunctionDef) and i.name.value == "__init__"),
            None,
        )
        if init is None or calls is None:
            continue
        read = names_in(init.body)
        positional = [p.name.value for p in init.params.params[1:]]
        unused: dict[str, int | None] = {}
        for index, param in enumerate(init.params.params[1:]):
            if param.name.value not in read and all(_droppable(c, param.name.value, index) for c in calls):
                unused[param.name.value] = index
        for param in init.params.kwonly_params:
            if param.name.value not in read and all(_droppable(c, param.name.value, None) for c in calls):
                unused[param.name.value] = None
        star = init.params.star_kwarg
        if isinstance(star, cst.Param) and star.name.value not in read:
            if all(a.keyword is None or a.keyword.value in positional for c in calls for a in c.args):
                unused["**"] = None
        if unused:
            removed[statement.name.value] = unused
    if not removed:
        return module
    return module.visit(_Drop(removed, context))


class _Uses(cst.CSTVisitor):
    """Every call of a bare name, and how often each name occurs at all."""

    def __init__(self) -> None:
        self.calls: dict[str, list[cst.Call]] = {}
        self.names: dict[str, int] = {}

    def visit_Call(self, node: cst.Call) -> None:
        if isinstance(node.func, cst.Name):
            self.calls.setdefault(node.func.value, []).append(node)

    def visit_Name(self, node: cst.Name) -> None:
        self.names[node.value] = self.names.get(node.value, 0) + 1

    def plain_calls(self, class_name: str) -> list[cst.Call] | None:
        """Every call of `class_name`, or None when the name is used other than by calls without
        `*`/`**` arguments (the class statement's own name aside)."""
        calls = self.calls.get(class_name, [])
        if self.names.get(class_name, 0) != len(calls) + 1 or any(a.star for c in calls for a in c.args):
            return None
        return calls


def _argument(call: cst.Call, param: str, index: int | None) -> cst.Arg | None:
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == param:
            return arg
    positional = [a for a in call.args if a.keyword is None]
    if index is not None and index < len(positional):
        return positional[index]
    return None


def _droppable(call: cst.Call, param: str, index: int | None) -> bool:
    arg = _argument(call, param, index)
    return arg is None or is_pure(arg.value)


class _Drop(cst.CSTTransformer):
    def __init__(self, removed: dict[str, dict[str, int | None]], context: PortContext) -> None:
        self.removed = removed
        self.context = context
        self.classes: list[str] = []

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self.classes.append(node.name.value)

    def leave_ClassDef(self, original, updated):
        self.classes.pop()
        return updated

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        unused = self.removed.get(self.classes[-1]) if self.classes else None
        if updated.name.value != "__init__" or not unused:
            return updated
        params = updated.params
        new = params.with_changes(
            params=[
                p.with_changes(comma=cst.MaybeSentinel.DEFAULT)
                for p in params.params
                if p.name.value not in unused
            ],
            kwonly_params=[
                p.with_changes(comma=cst.MaybeSentinel.DEFAULT)
                for p in params.kwonly_params
                if p.name.value not in unused
            ],
            star_kwarg=None if "**" in unused else params.star_kwarg,
        )
        if not new.kwonly_params and isinstance(new.star_arg, cst.ParamStar):
            new = new.with_changes(star_arg=cst.MaybeSentinel.DEFAULT)
        where = f"{self.classes[-1]}.__init__"
        self.context.record("unread-attributes", where, code_of(params), code_of(new), "nothing reads it")
        return updated.with_changes(params=new)

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
        unused = self.removed.get(updated.func.value) if isinstance(updated.func, cst.Name) else None
        if not unused:
            return updated
        gone = {id(_argument(original, p, i)) for p, i in unused.items() if p != "**"}
        args = [new for old, new in zip(original.args, updated.args) if id(old) not in gone]
        if len(args) == len(updated.args):
            return updated
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=args)

    def leave_ListComp(self, original, updated):
        return _unread_target(updated)

    def leave_GeneratorExp(self, original, updated):
        return _unread_target(updated)


def _unread_target(comprehension):
    """`[Layer(config) for layer_idx in range(n)]` -> `[Layer(config) for _ in range(n)]`."""
    loop = comprehension.for_in
    if not isinstance(loop.target, cst.Name) or loop.target.value == "_" or loop.inner_for_in:
        return comprehension
    if loop.target.value in names_in(comprehension.elt) or any(
        loop.target.value in names_in(i) for i in loop.ifs
    ):
        return comprehension
    return comprehension.with_changes(for_in=loop.with_changes(target=cst.Name("_")))
