"""Removes what only training does: dropout (functional calls, modules, their rates) and layerdrop.

`nn.functional.dropout(x, ...)`, `F.dropout(x, ...)` and calls of an `nn.Dropout` attribute become
`x`; an assignment left as `x = x` disappears; `a if not self.training else b` becomes `a`; an
attribute holding a dropout or layerdrop rate goes once nothing reads it. (`if self.training:`
blocks are decided by the dead-code rewrite, which knows `self.training` is False.)
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, code_of, dotted_name, self_attribute
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
        return module.visit(_UnusedRates(context, _attributes_read(module)))


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
        if any(word in attr.lower() or word in value.lower() for word in TRAINING_ONLY_WORDS):
            self.context.record(
                "strip-training", self.where, updated, "", "training-only rate, nothing reads it now"
            )
            return cst.RemovalSentinel.REMOVE
        return updated
