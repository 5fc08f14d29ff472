"""A submodule chosen by a conditional expression -> the same choice as an `if`/`else` statement.

`self.mlp = MoE(config) if layer_idx >= config.first_k_dense_replace else MLP(config)` builds one
of two classes of the file; written as

    if layer_idx >= config.first_k_dense_replace:
        self.mlp = MoE(config)
    else:
        self.mlp = MLP(config)

each branch is one construction, which is how the model index links an attribute to the classes it
may hold (so both are ported, an experts module inside either included). Only `__init__`
assignments whose two branches both build a class of the file change; `nn.Linear(...) if c else
None` and the like stay.
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import call_name, self_attribute
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite

RULE = "conditional-modules"


class SplitConditionalModules(Rewrite):
    name = RULE

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context, set(context.index.classes)))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, classes: set[str]) -> None:
        super().__init__(context)
        self.classes = classes

    def leave_SimpleStatementLine(
        self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
    ) -> cst.BaseStatement:
        if self.current_function != "__init__" or len(updated.body) != 1:
            return updated
        assign = updated.body[0]
        if not (
            isinstance(assign, cst.Assign)
            and len(assign.targets) == 1
            and self_attribute(assign.targets[0].target) is not None
            and isinstance(assign.value, cst.IfExp)
        ):
            return updated
        choice = assign.value
        if not all(call_name(branch) in self.classes for branch in (choice.body, choice.orelse)):
            return updated
        target = assign.targets[0].target
        new = cst.If(
            test=choice.test,
            body=cst.IndentedBlock(body=[_assignment(target, choice.body)]),
            orelse=cst.Else(body=cst.IndentedBlock(body=[_assignment(target, choice.orelse)])),
            leading_lines=updated.leading_lines,
        )
        self.context.record(RULE, self.where, updated, new, "each branch builds one class of the file")
        return new


def _assignment(target: cst.BaseAssignTargetExpression, value: cst.BaseExpression) -> cst.SimpleStatementLine:
    return cst.SimpleStatementLine(body=[cst.Assign(targets=[cst.AssignTarget(target=target)], value=value)])
