"""Removes what only an optional attention library needed, once the port runs without it.

The attributes `porter.analysis.optional_backends` decides False (`self._use_flash_attention_2 =
is_flash_attn_2_available() and ...`) have had their branches decided; here the attribute goes
once nothing reads it, and a module-level `if is_flash_attn_2_available(): from flash_attn import
...` keeps only its `else` (the port never imports the library).
"""

from __future__ import annotations

import libcst as cst

from porter.analysis.cst_utils import code_of, self_attribute, self_attributes_read
from porter.analysis.optional_backends import asks_availability
from porter.rewrites.base import ClassScopedTransformer, PortContext, Rewrite


class DropOptionalLibraries(Rewrite):
    name = "optional-libraries"

    def apply(self, module: cst.Module, context: PortContext) -> cst.Module:
        return module.visit(_Transformer(context, self_attributes_read(module)))


class _Transformer(ClassScopedTransformer):
    def __init__(self, context: PortContext, read: set[str]) -> None:
        super().__init__(context)
        self.read = read

    def leave_If(self, original: cst.If, updated: cst.If) -> cst.BaseStatement | cst.FlattenSentinel:
        if self.current_class is not None or self.current_function is not None:
            return updated
        if not asks_availability(updated.test):
            return updated
        self.context.record(
            "optional-libraries",
            "module",
            f"if {code_of(updated.test)}: ...",
            "",
            "the port needs no optional library",
        )
        if isinstance(updated.orelse, cst.Else):
            return cst.FlattenSentinel(updated.orelse.body.body)
        return cst.RemovalSentinel.REMOVE

    def leave_SimpleStatementLine(self, original, updated: cst.SimpleStatementLine):
        if self.current_function != "__init__" or len(updated.body) != 1:
            return updated
        small = updated.body[0]
        if not isinstance(small, cst.Assign) or len(small.targets) != 1:
            return updated
        attr = self_attribute(small.targets[0].target)
        flags = self.context.plan.constant_attributes
        if attr is None or attr in self.read or flags.get((self.current_class, attr)) is not False:
            return updated
        if not _requires_optional_library(small.value):
            return updated
        self.context.record("optional-libraries", self.where, updated, "", "decided False, nothing reads it")
        return cst.RemovalSentinel.REMOVE


def _requires_optional_library(value: cst.BaseExpression) -> bool:
    if isinstance(value, cst.BooleanOperation) and isinstance(value.operator, cst.And):
        return _requires_optional_library(value.left) or _requires_optional_library(value.right)
    return asks_availability(value)
