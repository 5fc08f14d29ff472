"""Removes what only training does: dropout (functional calls, modules, their rates) and layerdrop.

`nn.functional.dropout(x, ...)`, `F.dropout(x, ...)` and calls of an `nn.Dropout` attribute become
`x`; an assignment left as `x = x` disappears; `a if not self.training else b` becomes `a`; an
attribute holding a dropout or layerdrop rate goes once nothing reads it; so does a constructor
parameter for such a rate that `__init__` no longer reads (`dropout: float = 0.0`), with the
keyword argument every construction of the class passed it by. (`if self.training:` blocks are
decided by the dead-code rewrite, which knows `self.training` is False.)
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, dotted_name, names_in, self_attribute
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

FUNCTIONAL_DROPOUT = {
    "nn.functional.dropout",
    "F.dropout",
    "torch.dropout",
    "torch.nn.functional.dropout",
    "nn.functional.dropout1d",
    "nn.functional.dropout2d",
    "F.alpha_dropout",
}
DROPOUT_MODULES = {"nn.Dropout", "torch.nn.Dropout", "Dropout"}
TRAINING_ONLY_WORDS = ("dropout", "layerdrop", "drop_prob")


class StripTraining(Rewrite):
    name = "strip-training"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        dropout_modules = {
            (info.name, attr)
            for info in context.index.classes.values()
            for attr, call in info.init_calls.items()
            if call_name(call) in DROPOUT_MODULES
        }
        module = module.visit(_DropoutCalls(context, dropout_modules))
        module = module.visit(_UnusedRates(context, _attributes_read(module)))
        unused = _unused_rate_params(module)
        return module.visit(_UnusedRateParams(context, unused)) if unused else module


class _DropoutCalls(ClassScopedTransformer):
    def __init__(self, context: PortContext, dropout_modules: set[tuple[str, str]]) -> None:
        super().__init__(context)
        self.dropout_modules = dropout_modules

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        name = call_name(updated)
        attr = self_attribute(updated.func)
        is_module = attr is not None and (self.current_class, attr) in self.dropout_modules
        if (name in FUNCTIONAL_DROPOUT or is_module) and updated.args:
            self.context.record(
                "strip-training",
                self.where,
                original,
                updated.args[0].value,
                "dropout is identity at inference",
            )
            return updated.args[0].value
        return updated

    def leave_IfExp(self, original: cst.IfExp, updated: cst.IfExp) -> cst.BaseExpression:
        test = updated.test
        if (
            isinstance(test, cst.UnaryOperation)
            and isinstance(test.operator, cst.Not)
            and dotted_name(test.expression) == "self.training"
        ):
            return updated.body
        if dotted_name(test) == "self.training":
            return updated.orelse
        return updated

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        if len(updated.body) == 1 and isinstance(updated.body[0], cst.Assign):
            assign = updated.body[0]
            if len(assign.targets) == 1 and code_of(assign.targets[0].target) == code_of(assign.value):
                return cst.RemovalSentinel.REMOVE
        return updated


def _attributes_read(module: cst.Module) -> set[tuple[str, str]]:
    reads: set[tuple[str, str]] = set()

    class _Reads(cst.CSTVisitor):
        def __init__(self) -> None:
            self.classes: list[str] = []
            self.assign_targets: set[int] = set()

        def visit_ClassDef(self, node: cst.ClassDef) -> None:
            self.classes.append(node.name.value)

        def leave_ClassDef(self, node: cst.ClassDef) -> None:
            self.classes.pop()

        def visit_AssignTarget(self, node: cst.AssignTarget) -> None:
            self.assign_targets.add(id(node.target))

        def visit_Attribute(self, node: cst.Attribute) -> None:
            attr = self_attribute(node)
            if attr and self.classes and id(node) not in self.assign_targets:
                reads.add((self.classes[-1], attr))

    module.visit(_Reads())
    return reads


class _UnusedRates(ClassScopedTransformer):
    def __init__(self, context: PortContext, reads: set[tuple[str, str]]) -> None:
        super().__init__(context)
        self.reads = reads

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        if (
            self.current_function != "__init__"
            or len(updated.body) != 1
            or not isinstance(updated.body[0], cst.Assign)
        ):
            return updated
        attr = self_attribute(updated.body[0].targets[0].target)
        if attr is None or (self.current_class, attr) in self.reads:
            return updated
        value = code_of(updated.body[0].value)
        if (
            isinstance(updated.body[0].value, cst.Call)
            and (call_name(updated.body[0].value) or "") in self.context.index.classes
        ):
            return updated  # a submodule built with a dropout rate is no rate (unused-modules decides)
        if any(word in attr.lower() or word in value.lower() for word in TRAINING_ONLY_WORDS):
            self.context.record(
                "strip-training", self.where, updated, "", "training-only rate, nothing reads it now"
            )
            return cst.RemovalSentinel.REMOVE
        return updated


def _unused_rate_params(module: cst.Module) -> dict[str, set[str]]:
    """Class -> `__init__` parameters named for a training-only rate that the body no longer reads
    and that no construction of the class reaches by position (keywords can simply go)."""
    inits: dict[str, cst.FunctionDef] = {}
    for statement in module.body:
        if isinstance(statement, cst.ClassDef):
            for item in statement.body.body:
                if isinstance(item, cst.FunctionDef) and item.name.value == "__init__":
                    inits[statement.name.value] = item
    positional: dict[str, float] = {}  # class -> most positional arguments any construction passes

    class _Calls(cst.CSTVisitor):
        def visit_Call(self, node: cst.Call) -> None:
            name = call_name(node)
            if name in inits:
                count = (
                    float("inf")
                    if any(a.star for a in node.args)
                    else sum(a.keyword is None for a in node.args)
                )
                positional[name] = max(positional.get(name, 0), count)

    module.visit(_Calls())
    found: dict[str, set[str]] = {}
    for name, init in inits.items():
        read = names_in(init.body)
        ordered = [p.name.value for p in init.params.params][1:]  # after self
        unused = {
            p.name.value
            for p in (*init.params.params, *init.params.kwonly_params)
            if p.default is not None
            and any(word in p.name.value.lower() for word in TRAINING_ONLY_WORDS)
            and p.name.value not in read
            and (p.name.value not in ordered or ordered.index(p.name.value) >= positional.get(name, 0))
        }
        if unused:
            found[name] = unused
    return found


class _UnusedRateParams(ClassScopedTransformer):
    def __init__(self, context: PortContext, unused: dict[str, set[str]]) -> None:
        super().__init__(context)
        self.unused = unused

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef):
        gone = self.unused.get(self.current_class or "", set())
        if updated.name.value == "__init__" and gone and self.current_function == "__init__":
            params = updated.params
            kept = [p for p in params.params if p.name.value not in gone]
            kwonly = [p for p in params.kwonly_params if p.name.value not in gone]
            if (
                kept
                and not kwonly
                and params.star_arg is cst.MaybeSentinel.DEFAULT
                and params.star_kwarg is None
            ):
                kept[-1] = kept[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
            new_params = params.with_changes(params=kept, kwonly_params=kwonly)
            self.context.record(
                "strip-training",
                self.where,
                ", ".join(sorted(gone)),
                "",
                "a training-only rate nothing reads",
            )
            updated = updated.with_changes(params=new_params)
        return super().leave_FunctionDef(original, updated)

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        gone = self.unused.get(call_name(updated) or "", set())
        if not gone:
            return updated
        args = [a for a in updated.args if a.keyword is None or a.keyword.value not in gone]
        if len(args) == len(updated.args):
            return updated
        if args:
            args[-1] = args[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
        return updated.with_changes(args=args)
